//! Integration tests: the real server, a real Postgres (a fresh database per test) or the
//! in-memory store, real HTTP and WebSocket clients. One binary, so one link step.

mod helpers;

mod concurrency;
mod delivery;
mod errors;
mod schema;
mod websocket;
