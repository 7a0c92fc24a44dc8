"""The primary layer: the process that owns the listeners and supervises the workers.

  arbiter.py    the primary loop: spawn, reap, signals, reload, scale, stop
  lifecycle/    the worker lifecycle, sans-IO: events in, actions out, time a parameter
  listeners.py  binding and adopting listening sockets (TCP, unix, fd://)
  messages.py   messages between the primary and its workers
  control.py    the control socket behind ``pyfork status``
  watched.py    a listener served through the dispatcher's watched fds (control, metrics)
  wakeup.py     the signal -> loop bridge (``signal.set_wakeup_fd``)
  sched.py      the primary's CPU scheduling class (SCHED_BATCH)
  fdlimit.py    RLIMIT_NOFILE raised to the hard limit at start
"""
