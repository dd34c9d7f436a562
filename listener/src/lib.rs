//! The front of an MQTT connection, before its CONNECT: the PROXY protocol
//! header from a trusted load balancer, TLS termination (SNI, ALPN, mTLS,
//! rotation) and the WebSocket upgrade.
//!
//! One crate so that the balancer's listeners and the bundled broker's
//! accept exactly the same things and refuse the same things the same way;
//! each then reads the CONNECT its own way.
//!
//! Solved problems come from well-kept libraries, not from here:
//! * TLS: rustls with the ring provider (memory-safe, no OpenSSL at build
//!   or run time, builds without cmake) through tokio-rustls;
//! * X.509 names: x509-parser (rustls verifies chains but exposes no names);
//! * WebSocket: tokio-tungstenite (framing, masking, ping/pong, close);
//! * PROXY protocol v1/v2: ppp.
//!
//! Modules:
//! * [`pem`]: reading certificates, keys, CA bundles and CRLs, with errors
//!   that name the file;
//! * [`proxy`]: the PROXY protocol header, under a deadline and a size cap;
//! * [`rewind`]: a socket that first replays bytes already read from it;
//! * [`tls`]: the TLS acceptor and the client certificate's identity;
//! * [`ws`]: the WebSocket upgrade and binary frames as a byte stream.

pub mod pem;
pub mod proxy;
pub mod rewind;
pub mod tls;
pub mod ws;
