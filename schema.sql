-- Tables of server.py. The server and its commands run this file at start-up, so it must stay
-- idempotent. The `users` Table in server.py describes the same columns; tests/test_schema.py
-- checks that the two agree.

CREATE TABLE IF NOT EXISTS users (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    username      varchar(1024) NOT NULL UNIQUE,
    password_hash text NOT NULL,            -- argon2id, PHC string format
    created_at    timestamptz NOT NULL DEFAULT now()
);
