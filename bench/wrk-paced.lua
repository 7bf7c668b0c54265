-- wrk script of the peers scenario's paced load: each connection waits 1 ms
-- after each response before it sends its next request, so that every server
-- gets about the same load (16 connections: about 16 / (1 ms + latency)
-- requests a second), well below what saturates the machine.
delay = function()
  return 1
end
