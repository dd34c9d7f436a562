//! DNS discovery: pools whose backends come from A/AAAA records (a
//! Kubernetes headless Service) or SRV records (port and weight), re-resolved
//! at the records' TTL clamped to the pool's bounds.
//!
//! Uses hickory-resolver: a maintained, async, caching resolver, so backend
//! host names are not resolved through the blocking `getaddrinfo` pool on
//! every connect, and the TTL is known.
//!
//! Backend names are derived from what every replica sees the same way
//! (`pool/ip:port` for A answers, `pool/target:port` for SRV), so replicas
//! place a client identically. A failed resolution keeps the last good set
//! (and says so); an empty answer does too unless the pool allows it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::config::{NameServerConfigGroup, ResolverConfig, ResolverOpts};
use hickory_resolver::TokioAsyncResolver;
use mqlb_config::{Backend, DnsPool};
use tokio_util::sync::CancellationToken;

use crate::shared::Shared;

/// A resolver on the configured servers, or the system's.
pub fn resolver(servers: &[SocketAddr]) -> TokioAsyncResolver {
    let mut opts = ResolverOpts::default();
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 2;
    if servers.is_empty() {
        return TokioAsyncResolver::tokio_from_system_conf()
            .unwrap_or_else(|_| TokioAsyncResolver::tokio(ResolverConfig::default(), opts));
    }
    let ips: Vec<IpAddr> = servers.iter().map(SocketAddr::ip).collect();
    let port = servers.first().map_or(53, SocketAddr::port);
    let group = NameServerConfigGroup::from_ips_clear(&ips, port, true);
    TokioAsyncResolver::tokio(ResolverConfig::from_parts(None, vec![], group), opts)
}

/// NXDOMAIN or an empty answer: "nothing there", not a failure.
fn no_records(e: &hickory_resolver::error::ResolveError) -> bool {
    matches!(
        e.kind(),
        hickory_resolver::error::ResolveErrorKind::NoRecordsFound { .. }
    )
}

/// One resolution: the members and how long they are valid.
async fn resolve(
    resolver: &TokioAsyncResolver,
    pool: &DnsPool,
) -> Result<(Vec<Backend>, Duration), String> {
    let now = Instant::now();
    if pool.srv {
        let answer = match resolver.srv_lookup(pool.dns.as_str()).await {
            Ok(a) => a,
            Err(e) if no_records(&e) => return Ok((Vec::new(), pool.min_ttl)),
            Err(e) => return Err(e.to_string()),
        };
        let ttl = answer
            .as_lookup()
            .valid_until()
            .saturating_duration_since(now);
        let mut members = Vec::new();
        for srv in answer.iter() {
            let target = srv.target().to_utf8();
            let target = target.trim_end_matches('.').to_string();
            // The address is the target's IP, so probes and connections
            // need no other resolver; the name keeps the target.
            let ip = resolver
                .lookup_ip(target.as_str())
                .await
                .map_err(|e| format!("{target}: {e}"))?
                .iter()
                .next()
                .ok_or_else(|| format!("{target}: no address"))?;
            members.push(Backend {
                name: format!("{}/{target}:{}", pool.name, srv.port()),
                address: SocketAddr::new(ip, srv.port()).to_string(),
                weight: u32::from(srv.weight()).max(1),
                pool: pool.name.clone(),
                send_proxy: false,
                tls: None,
                websocket: None,
                cluster_admin: None,
            });
        }
        return Ok((members, ttl));
    }
    let answer = match resolver.lookup_ip(pool.dns.as_str()).await {
        Ok(a) => a,
        Err(e) if no_records(&e) => return Ok((Vec::new(), pool.min_ttl)),
        Err(e) => return Err(e.to_string()),
    };
    let ttl = answer.valid_until().saturating_duration_since(now);
    let mut members: Vec<Backend> = answer
        .iter()
        .map(|ip| {
            let addr = SocketAddr::new(ip, pool.port).to_string();
            Backend {
                name: format!("{}/{addr}", pool.name),
                address: addr,
                weight: 1,
                pool: pool.name.clone(),
                send_proxy: false,
                tls: None,
                websocket: None,
                cluster_admin: None,
            }
        })
        .collect();
    members.sort_by(|a, b| a.name.cmp(&b.name));
    members.dedup_by(|a, b| a.name == b.name);
    Ok((members, ttl))
}

/// Keeps `pool`'s members in step with DNS until `stop`.
pub async fn follow(shared: Arc<Shared>, pool: DnsPool, stop: CancellationToken) {
    loop {
        let wait = match resolve(&shared.resolver, &pool).await {
            Ok((members, ttl)) if members.is_empty() && !pool.allow_empty => {
                tracing::warn!(pool = %pool.name, dns = %pool.dns, "empty DNS answer; keeping the last set");
                shared
                    .journal
                    .record("dns", &pool.name, "empty answer ignored, last set kept");
                ttl.clamp(pool.min_ttl, pool.max_ttl)
            }
            Ok((members, ttl)) => {
                shared.set_dns_members(&pool.name, members);
                ttl.clamp(pool.min_ttl, pool.max_ttl)
            }
            Err(e) => {
                tracing::warn!(pool = %pool.name, dns = %pool.dns, error = %e, "DNS resolution failed; keeping the last set");
                shared.journal.record(
                    "dns",
                    &pool.name,
                    format!("resolution failed ({e}), last set kept"),
                );
                pool.min_ttl
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
        }
    }
}
