-- POST /user as user0 .. user(N-1) in turn (BENCH_USERS), right passwords. With BENCH_SAVE set,
-- each new session id is appended to that file (for the DELETE scenario).
dofile(os.getenv("BENCH_DIR") .. "/report.lua")
local users = tonumber(os.getenv("BENCH_USERS") or "100")
local save = os.getenv("BENCH_SAVE")
local counter = 0
local out = nil

function setup(thread)
  thread:set("id", tostring(thread))
end

request = function()
  counter = counter + 1
  local n = counter % users
  local body = string.format('{"username": "user%d", "password": "password%d"}', n, n)
  return wrk.format("POST", "/user", {["Content-Type"] = "application/json"}, body)
end

if save and save ~= "" then
  response = function(status, headers, body)
    if status == 200 then
      if out == nil then out = io.open(save, "a") end
      local id = body:match('"session_id": "([^"]+)"')
      if id then out:write(id, "\n"); out:flush() end
    end
  end
end

done = report
