//! Integration tests: the real server, a real Postgres (a fresh database per test) or the
//! in-memory store, real HTTP and WebSocket clients. One binary, so one link step.

mod helpers;

mod auth;
mod batch;
mod cancel;
mod cluster;
mod concurrency;
mod delivery;
mod direct;
mod docs;
mod doctor;
mod errors;
mod feed;
mod frames;
mod fuzz;
mod http_limits;
mod jwks;
mod layout;
mod nextjs;
mod openapi;
mod operations;
mod partition;
mod process;
mod proxy;
mod queue;
mod quiet;
mod reporter;
mod reporter_tls;
mod schema;
mod sse;
mod stalled;
mod steps;
mod stream;
mod tables;
mod tls;
mod websocket;
