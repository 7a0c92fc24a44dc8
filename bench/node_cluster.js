// node_cluster.js -- Node's cluster module serving bench/hello_app.py's routes,
// the Node peer of bench/compare.py.
//
// Theory of operation: the primary forks WORKERS workers; each runs an
// http.Server on PORT. Node's cluster itself picks the scheduling policy from
// NODE_CLUSTER_SCHED_POLICY: "rr" (the primary accepts and passes handles to
// workers, Node's default on Linux) or "none" (workers share the listening
// socket and the kernel picks). A worker that dies is replaced; SIGHUP does the
// article's zero-downtime rolling restart (fork the replacement, wait until it
// listens, then disconnect the old worker); SIGTERM/SIGINT stop everything.
//
// Usage: PORT=8000 WORKERS=2 NODE_CLUSTER_SCHED_POLICY=rr node node_cluster.js
'use strict';
const cluster = require('node:cluster');
const http = require('node:http');

const PORT = parseInt(process.env.PORT || '8000', 10);
const WORKERS = parseInt(process.env.WORKERS || '2', 10);

function fib(n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }

if (cluster.isPrimary) {
  let stopping = false;
  let restarting = false;
  const spawn = () => cluster.fork();
  for (let i = 0; i < WORKERS; i++) spawn();
  cluster.on('exit', (worker) => {
    // Replace workers that died on their own; not those we retired.
    if (!stopping && !worker.exitedAfterDisconnect) spawn();
  });
  process.on('SIGHUP', async () => {
    if (restarting || stopping) return;
    restarting = true;
    for (const old of Object.values(cluster.workers)) {
      const fresh = spawn();
      await new Promise((resolve) => fresh.once('listening', resolve));
      old.disconnect();  // finishes in-flight connections, then exits
      const timer = setTimeout(() => old.kill('SIGKILL'), 30000);
      old.once('exit', () => clearTimeout(timer));
    }
    restarting = false;
  });
  const stop = () => {
    stopping = true;
    for (const w of Object.values(cluster.workers)) w.kill('SIGTERM');
    setTimeout(() => process.exit(0), 2000).unref();
    cluster.on('exit', () => { if (Object.keys(cluster.workers).length === 0) process.exit(0); });
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
} else {
  http.createServer((req, res) => {
    const url = new URL(req.url, 'http://x');
    let status = 200;
    let body;
    if (url.pathname === '/sleep') {
      // the slow route that uses no CPU, like asyncio.sleep in the ASGI app
      const ms = parseInt(url.searchParams.get('ms') || '25', 10);
      if (!(ms >= 0 && ms <= 10000)) { status = 400; body = 'ms must be 0..10000\n'; }
      else {
        setTimeout(() => {
          const b = `slept ${ms}ms pid=${process.pid}\n`;
          res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': Buffer.byteLength(b) });
          res.end(b);
        }, ms);
        return;
      }
    } else if (url.pathname === '/fibonacci') {
      const n = parseInt(url.searchParams.get('n') || '20', 10);
      if (!(n <= 35)) { status = 400; body = 'n above 35\n'; }
      else body = `fib(${n})=${fib(n)} pid=${process.pid}\n`;
    } else {
      body = `Hello, World! pid=${process.pid}\n`;
    }
    res.writeHead(status, { 'Content-Type': 'text/plain', 'Content-Length': Buffer.byteLength(body) });
    res.end(body);
  }).listen(PORT, '127.0.0.1');
}
