-- Tables of server.py. The server and its commands run this file at start-up, so it must stay
-- idempotent. The Tables in server.py describe the same columns; tests/test_schema.py checks
-- that the two agree.

CREATE TABLE IF NOT EXISTS users (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    username      varchar(1024) NOT NULL UNIQUE,
    password_hash text NOT NULL,            -- argon2id, PHC string format
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Sessions, when "sessions.store" is "postgres". Only a SHA-256 of each session id is kept, so a
-- leaked table or dump opens no session. Times are Unix seconds, as the server's clock gives them.
CREATE TABLE IF NOT EXISTS sessions (
    token_hash bytea PRIMARY KEY,
    seq        bigint GENERATED ALWAYS AS IDENTITY,   -- creation order: the oldest goes first
    username   varchar(1024) NOT NULL,
    created_at double precision NOT NULL,
    last_seen  double precision NOT NULL,
    expires_at double precision NOT NULL,
    public_id  text NOT NULL,               -- its name in GET /user/sessions: random, not derived from the id
    address    text NOT NULL,               -- the client address of the login, as the throttle saw it
    user_agent text NOT NULL                -- the login's User-Agent, at most 256 printable ASCII characters
);
CREATE INDEX IF NOT EXISTS sessions_username ON sessions (username);
-- Tables from before sessions had public ids: their sessions end (users log in again).
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS public_id text;
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS address text;
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS user_agent text;
DELETE FROM sessions WHERE public_id IS NULL OR address IS NULL OR user_agent IS NULL;
ALTER TABLE sessions ALTER COLUMN public_id SET NOT NULL, ALTER COLUMN address SET NOT NULL,
    ALTER COLUMN user_agent SET NOT NULL;
-- No index on expires_at: every request rewrites it, and the minute's sweep can scan the table.
DROP INDEX IF EXISTS sessions_expires_at;

-- Failed logins, shared by every server process when the session store is "postgres".
CREATE TABLE IF NOT EXISTS login_failures (
    key       varchar(1100) NOT NULL,           -- 'user:<username>' or 'address:<ip>'
    failed_at double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS login_failures_key ON login_failures (key, failed_at);
CREATE INDEX IF NOT EXISTS login_failures_failed_at ON login_failures (failed_at);
