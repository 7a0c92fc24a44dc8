-- wrk script: a client that connects first and sends its request 1 ms later (wrk's delay()
-- runs before each request, after the connection is up), one request per connection.
-- At 1 ms of think time every server gets nearly the same request rate, so tails compare
-- at equal load (bench/mixed_preconnect.py).
wrk.headers["Connection"] = "close"

function delay()
   return 1
end
