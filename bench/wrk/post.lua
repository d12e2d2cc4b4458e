-- POST the file named by $BODY_FILE to the URL given to wrk, e.g.
--   BODY_FILE=/tmp/cnn-bn-1.json wrk -t1 -c64 -d10s -s bench/wrk/post.lua http://127.0.0.1:8000/v2/models/cnn-bn/infer
local f = assert(io.open(os.getenv("BODY_FILE"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("CONTENT_TYPE") or "application/json"
local header_length = os.getenv("HEADER_LENGTH")
if header_length then
  wrk.headers["Inference-Header-Content-Length"] = header_length
end

function done(summary, latency, requests)
  io.write(string.format("non2xx=%d errors=%d\n", summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
