-- Tables of server.py. The server and its commands run this file at start-up, so it must stay
-- idempotent. The Tables in server.py describe the same columns; tests/test_schema.py checks
-- that the two agree.

CREATE TABLE IF NOT EXISTS users (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    username      varchar(1024) NOT NULL UNIQUE,
    password_hash text NOT NULL,            -- argon2id, PHC string format
    created_at    timestamptz NOT NULL DEFAULT now(),
    session_epoch bigint NOT NULL DEFAULT 0   -- raised by passwd: sessions of lower epochs end
);
ALTER TABLE users ADD COLUMN IF NOT EXISTS session_epoch bigint NOT NULL DEFAULT 0;

-- Sessions, when "sessions.store" is "postgres". Only a SHA-256 of each session id is kept, so a
-- leaked table or dump opens no session. Times are Unix seconds, as the server's clock gives them.
CREATE TABLE IF NOT EXISTS sessions (
    token_hash bytea PRIMARY KEY,
    seq        bigint GENERATED ALWAYS AS IDENTITY,   -- creation order: the oldest goes first
    username   varchar(1024) NOT NULL,       -- shown by GET /user; the account is user_id below
    created_at double precision NOT NULL,
    last_seen  double precision NOT NULL,
    expires_at double precision NOT NULL,
    public_id  text NOT NULL,               -- its name in GET /user/sessions: random, not derived from the id
    address    text NOT NULL,               -- the client address of the login, as the throttle saw it
    user_agent text NOT NULL,               -- the login's User-Agent, at most 256 printable ASCII characters
    user_id    bigint NOT NULL,             -- users.id: a new user of the same name is another account
    epoch      bigint NOT NULL              -- users.session_epoch when the session began
);
-- Tables from before sessions had public ids or accounts: their sessions end (users log in again).
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS public_id text;
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS address text;
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS user_agent text;
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS user_id bigint;
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS epoch bigint;
DELETE FROM sessions WHERE public_id IS NULL OR address IS NULL OR user_agent IS NULL
    OR user_id IS NULL OR epoch IS NULL;
ALTER TABLE sessions ALTER COLUMN public_id SET NOT NULL, ALTER COLUMN address SET NOT NULL,
    ALTER COLUMN user_agent SET NOT NULL, ALTER COLUMN user_id SET NOT NULL,
    ALTER COLUMN epoch SET NOT NULL;
DROP INDEX IF EXISTS sessions_username;
CREATE INDEX IF NOT EXISTS sessions_user_id ON sessions (user_id);
-- No index on expires_at: every request rewrites it, and the minute's sweep can scan the table.
DROP INDEX IF EXISTS sessions_expires_at;

-- Failed logins, shared by every server process when the session store is "postgres".
CREATE TABLE IF NOT EXISTS login_failures (
    key       varchar(1100) NOT NULL,           -- 'user:<username>' or 'address:<ip>'
    failed_at double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS login_failures_key ON login_failures (key, failed_at);
CREATE INDEX IF NOT EXISTS login_failures_failed_at ON login_failures (failed_at);
-- An attempt in flight, reserved before its password is checked: counted like a failure until the
-- server settles it (NULL: a failure; a right password deletes it).
ALTER TABLE login_failures ADD COLUMN IF NOT EXISTS token text;

-- Reserve a login attempt under each key (the username's, the address's) before its password is
-- checked, in one statement: the keys' advisory locks are taken in a fixed order, then every
-- process's committed rows are counted. Returns the seconds to wait when failures fill a key's
-- limit, -1 when attempts in flight fill it (ask again soon: they may succeed), else 0 (reserved).
-- An attempt in flight for longer than `stale` seconds died with its process: it counts as failed.
CREATE OR REPLACE FUNCTION login_attempt(keys text[], limits integer[], attempted_at double precision,
        window_seconds double precision, token text, stale double precision)
    RETURNS double precision LANGUAGE plpgsql AS $$
DECLARE
    wait double precision := 0;
    busy boolean := false;
    failed double precision[];
    pending integer;
BEGIN
    PERFORM pg_advisory_xact_lock(h) FROM (
        SELECT DISTINCT hashtextextended(k, 1819240293) AS h FROM unnest(keys) k ORDER BY 1) locks;
    FOR i IN 1 .. cardinality(keys) LOOP
        -- One statement, one snapshot: an attempt settled between two reads would be in neither.
        SELECT coalesce(array_agg(f.failed_at ORDER BY f.failed_at DESC) FILTER (
                    WHERE f.failed_at > attempted_at - window_seconds
                        AND (f.token IS NULL OR f.failed_at <= attempted_at - stale)), '{}'),
                count(*) FILTER (WHERE f.token IS NOT NULL AND f.failed_at > attempted_at - stale)
            INTO failed, pending
            FROM login_failures f
            WHERE f.key = keys[i] AND f.failed_at > attempted_at - greatest(window_seconds, stale);
        IF cardinality(failed) >= limits[i] THEN
            wait := greatest(wait, failed[limits[i]] + window_seconds - attempted_at);
        END IF;
        busy := busy OR cardinality(failed) + pending >= limits[i];
    END LOOP;
    IF wait > 0 THEN
        RETURN wait;
    ELSIF busy THEN
        RETURN -1;
    END IF;
    INSERT INTO login_failures (key, failed_at, token) SELECT k, attempted_at, token FROM unnest(keys) k;
    RETURN 0;
END $$;

-- Sessions follow the account. Deleting a user, or raising its session_epoch (passwd does), ends
-- its sessions: rows of the "postgres" store here, in the same transaction, and those every
-- server process keeps in memory through a notification on 'session_revocations' at commit.
-- The session journal (below) records these as 'revoked', the reason `passwd`, `deluser`, or what
-- the transaction named in the setting loginservice.revoke (`logout NAME`: 'operator').
CREATE OR REPLACE FUNCTION users_end_sessions() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    below bigint := CASE WHEN TG_OP = 'DELETE' THEN NULL ELSE NEW.session_epoch END;
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.session_epoch = OLD.session_epoch THEN
        RETURN NULL;
    END IF;
    PERFORM set_config('loginservice.ending', 'revoked:' || coalesce(
        nullif(current_setting('loginservice.revoke', true), ''),
        CASE WHEN TG_OP = 'DELETE' THEN 'deluser' ELSE 'passwd' END), true);
    DELETE FROM sessions WHERE user_id = OLD.id AND (below IS NULL OR epoch < below);
    IF TG_OP = 'DELETE' THEN  -- the account's events go with it
        DELETE FROM events WHERE user_id = OLD.id;
    END IF;
    PERFORM pg_notify('session_revocations',
        json_build_object('user_id', OLD.id, 'epoch', below, 'reason', 'revoked')::text);
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS users_end_sessions ON users;
CREATE TRIGGER users_end_sessions AFTER DELETE OR UPDATE OF session_epoch ON users
    FOR EACH ROW EXECUTE FUNCTION users_end_sessions();

-- Live events: the record of what was published. username NULL: for every logged-in user.
CREATE SEQUENCE IF NOT EXISTS events_id_seq;
CREATE TABLE IF NOT EXISTS events (
    id         bigint PRIMARY KEY,              -- drawn by the trigger below, in commit order
    username   varchar(1024),                   -- as the publisher named the user
    data       jsonb NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
ALTER SEQUENCE events_id_seq OWNED BY events.id;
CREATE INDEX IF NOT EXISTS events_created_at ON events (created_at);
-- A topic event (topic set, username NULL) goes to the streams subscribed to the topic; sender is
-- the user who published it over HTTP (the event's "from"), NULL for commands, SQL and Python.
ALTER TABLE events ADD COLUMN IF NOT EXISTS topic varchar(200)
    CHECK (topic ~ '^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,199}$');
ALTER TABLE events ADD COLUMN IF NOT EXISTS sender varchar(1024);
DO $$ BEGIN
    ALTER TABLE events ADD CONSTRAINT events_one_audience CHECK (username IS NULL OR topic IS NULL);
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;
-- user_id: the account that had the name when the event was inserted (the trigger below binds it).
-- Events addressed by name before they followed the account: bound, once, when the column is
-- added, to the account that has that name then; those of no account reach nobody, ever.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_attribute WHERE attrelid = 'events'::regclass
                   AND attname = 'user_id' AND NOT attisdropped) THEN
        ALTER TABLE events ADD COLUMN user_id bigint;
        UPDATE events e SET user_id = u.id FROM users u
            WHERE e.username IS NOT NULL AND u.username = e.username;
    END IF;
END $$;

-- The newest id the retention sweep has deleted: a replay from before it is "replay_truncated".
CREATE TABLE IF NOT EXISTS events_dropped (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    through  bigint NOT NULL DEFAULT 0
);
INSERT INTO events_dropped DEFAULT VALUES ON CONFLICT DO NOTHING;

-- Publishing takes turns: each insert waits for the previous publisher's transaction to end before
-- it draws its id, so ids become visible in increasing order and a reader that has seen id N has
-- seen every committed id below N. The notification carries the id only and goes out at commit
-- (never on rollback); listeners read the row from the table.
CREATE OR REPLACE FUNCTION events_publish() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- An event is at most 64 KiB of JSON, from SQL too: every process reads it within its timeouts.
    IF octet_length(NEW.data::text) > 65536 THEN
        RAISE EXCEPTION 'event data over 64 KiB' USING ERRCODE = 'check_violation';
    END IF;
    -- An event for a user follows the account that has the name now, not a later one of that name.
    IF NEW.username IS NOT NULL THEN
        NEW.user_id := (SELECT id FROM users WHERE username = NEW.username);
    END IF;
    PERFORM pg_advisory_xact_lock(1702258515);  -- 0x6576_7453: 'evtS'
    NEW.id := nextval('events_id_seq');
    PERFORM pg_notify('events', NEW.id::text);
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS events_publish ON events;
CREATE TRIGGER events_publish BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION events_publish();

-- Open event streams per session and server process, for GET /user/sessions with a shared session
-- store: each process writes its own rows, naming its listening connection (pid, backend_start);
-- a row counts only while that connection is in pg_stat_activity, so a killed process's streams
-- stop counting as soon as PostgreSQL sees its connection close. Dead rows are swept now and then.
CREATE TABLE IF NOT EXISTS session_streams (
    public_id    text NOT NULL,                 -- sessions.public_id (or the Redis store's)
    process      text NOT NULL,                 -- a random name per server process
    holder_pid   integer NOT NULL,              -- that process's listening connection ...
    holder_start timestamptz NOT NULL,          -- ... as pg_stat_activity shows it (pid, backend_start)
    streams      integer NOT NULL,
    PRIMARY KEY (public_id, process)
);

-- The session journal: every session's life (login, logout, evicted, revoked, expired; stream
-- opened and closed when journal.streams is on), for backends that must not miss a logout. Ids are
-- drawn as the events' are: each insert waits for the previous journaling transaction to end, so
-- ids become visible in increasing order, and a reader that has seen id N has seen every committed
-- id below N. Listeners on 'session_journal' hear each new id at commit. Old entries are deleted
-- after journal.retention seconds.
CREATE SEQUENCE IF NOT EXISTS session_journal_id_seq;
CREATE TABLE IF NOT EXISTS session_journal (
    id         bigint PRIMARY KEY,                  -- drawn by the trigger below, in commit order
    at         timestamptz NOT NULL DEFAULT now(),  -- when the change's transaction began
    kind       text NOT NULL,                       -- login, logout, evicted, revoked, expired, stream_...
    username   varchar(1024) NOT NULL,
    user_id    bigint NOT NULL,                     -- users.id: the account
    session    text NOT NULL,                       -- the session's public id (as GET /user/sessions shows it)
    address    text NOT NULL,                       -- the client address of the login
    user_agent text NOT NULL,                       -- the login's User-Agent
    reason     text                                 -- what ended it, or the stream's transport or end
);
ALTER SEQUENCE session_journal_id_seq OWNED BY session_journal.id;
CREATE INDEX IF NOT EXISTS session_journal_at ON session_journal (at);

CREATE OR REPLACE FUNCTION session_journal_order() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(1786934894);  -- 0x6A82_6C6E: 'jrnl'
    NEW.id := nextval('session_journal_id_seq');
    PERFORM pg_notify('session_journal', NEW.id::text);
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS session_journal_order ON session_journal;
CREATE TRIGGER session_journal_order BEFORE INSERT ON session_journal
    FOR EACH ROW EXECUTE FUNCTION session_journal_order();

-- With the "postgres" session store, each change to `sessions` is journaled in its own transaction:
-- a login as it is inserted; a session deleted as the statement that deleted it says in the setting
-- loginservice.ending ('kind:reason'; the server sets it within the statement), or as 'expired' if
-- it had expired by loginservice.now (the server's clock), or as 'revoked' (deleted by hand).
CREATE OR REPLACE FUNCTION sessions_journal() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ending text := coalesce(nullif(current_setting('loginservice.ending', true), ''), 'revoked:sql');
    moment text := nullif(current_setting('loginservice.now', true), '');
    kind text := split_part(ending, ':', 1);
    reason text := nullif(split_part(ending, ':', 2), '');
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO session_journal (kind, username, user_id, session, address, user_agent)
        VALUES ('login', NEW.username, NEW.user_id, NEW.public_id, NEW.address, NEW.user_agent);
        RETURN NULL;
    END IF;
    IF OLD.expires_at <= coalesce(moment::float8, extract(epoch FROM clock_timestamp())) THEN
        kind := 'expired';
        reason := NULL;
    END IF;
    INSERT INTO session_journal (kind, username, user_id, session, address, user_agent, reason)
    VALUES (kind, OLD.username, OLD.user_id, OLD.public_id, OLD.address, OLD.user_agent, reason);
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS sessions_journal ON sessions;
CREATE TRIGGER sessions_journal AFTER INSERT OR DELETE ON sessions
    FOR EACH ROW EXECUTE FUNCTION sessions_journal();

-- Members of the topics whose rule says "members" (subscribe) or "publishers" (publish), by
-- account: a new user who takes a deleted user's name is no member. Removing a row (DELETE,
-- `topic remove`, or deleting the user) ends that topic on the member's open streams in every
-- server process: the trigger's notification on 'topic_members' goes out at commit.
CREATE TABLE IF NOT EXISTS topic_members (
    topic     varchar(200) NOT NULL CHECK (topic ~ '^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,199}$'),
    user_id   bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    publisher boolean NOT NULL DEFAULT false,   -- may publish where the rule says "publishers"
    PRIMARY KEY (topic, user_id)
);
CREATE INDEX IF NOT EXISTS topic_members_user_id ON topic_members (user_id);

CREATE OR REPLACE FUNCTION topic_members_ended() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.topic = OLD.topic AND NEW.user_id = OLD.user_id THEN
        RETURN NULL;
    END IF;
    PERFORM pg_notify('topic_members', json_build_object('user_id', OLD.user_id, 'topic', OLD.topic)::text);
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS topic_members_ended ON topic_members;
CREATE TRIGGER topic_members_ended AFTER DELETE OR UPDATE ON topic_members
    FOR EACH ROW EXECUTE FUNCTION topic_members_ended();

-- The schema.sql the tables were last brought up to date with (a SHA-256 of this file's text).
-- The server and its commands run this file only when it differs from today's, so they take no
-- table lock on a database that is up to date.
CREATE TABLE IF NOT EXISTS schema_version (
    only_row   boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    digest     text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
