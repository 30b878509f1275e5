-- GET /user with the session in BENCH_SESSION (or the ceiling's GET /user).
dofile(os.getenv("BENCH_DIR") .. "/report.lua")
local session = os.getenv("BENCH_SESSION") or ""
wrk.method = "GET"
wrk.headers["Authorization"] = session
done = report
