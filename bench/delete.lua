-- DELETE /user once for each session id in the file BENCH_SESSIONS, then stop.
dofile(os.getenv("BENCH_DIR") .. "/report.lua")
local ids = {}
for line in io.lines(os.getenv("BENCH_SESSIONS")) do ids[#ids + 1] = line end
local next_id = 0

request = function()
  next_id = next_id + 1
  if next_id > #ids then
    wrk.thread:stop()
    next_id = #ids
  end
  return wrk.format("DELETE", "/user", {["Authorization"] = ids[next_id]})
end

done = report
