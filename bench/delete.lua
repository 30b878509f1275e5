-- DELETE /user once for each session id in the file BENCH_SESSIONS. Past the end it repeats the
-- last id (answered 401 and not counted); bench/run.py sizes the run so that rarely happens.
dofile(os.getenv("BENCH_DIR") .. "/report.lua")
local ids = {}
for line in io.lines(os.getenv("BENCH_SESSIONS")) do ids[#ids + 1] = line end
local sent = 0

request = function()
  sent = math.min(sent + 1, #ids)
  return wrk.format("DELETE", "/user", {["Authorization"] = ids[sent]})
end

done = report
