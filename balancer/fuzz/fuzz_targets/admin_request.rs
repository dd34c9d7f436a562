//! Arbitrary bytes as a request to the balancer's admin API: parsed as
//! HTTP/1.1 (httparse, hyper's own parser), judged by the admin access
//! rules (token, Host, cross-site) and, when let through, routed (every
//! handler, percent-decoding of client IDs included). It must never
//! panic; a refusal is always 401 or 403; a request with no valid token
//! never changes state (no backend is drained).
#![no_main]

use std::sync::{Arc, OnceLock};

use hyper::header::{HeaderName, HeaderValue};
use hyper::{HeaderMap, Method, StatusCode};
use libfuzzer_sys::fuzz_target;
use mqlb_balancer::http::Access;
use mqlb_balancer::shared::Shared;

/// The token the fixture's API holds.
const TOKEN: &str = "fuzz-admin-token-0123456789";

struct Fixture {
    rt: tokio::runtime::Runtime,
    shared: Arc<Shared>,
    access: Access,
    /// Kept bound (not served): `shared` lives as long as it.
    _balancer: mqlb_balancer::Balancer,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mqlb-fuzz-admin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch");
        let token = dir.join("token");
        std::fs::write(&token, TOKEN).expect("token");
        let text = "[[listener]]\naddress = \"127.0.0.1:0\"\n\
                    [[backend]]\nname = \"b1\"\naddress = \"127.0.0.1:1\"\n\
                    [[backend]]\nname = \"b 2/x\"\naddress = \"127.0.0.1:2\"\n\
                    [health]\nenabled = false\n";
        let config = mqlb_config::Config::parse("<fuzz>", text).expect("config");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let balancer = rt
            .block_on(mqlb_balancer::Balancer::bind(config))
            .expect("bind");
        let shared = balancer.shared();
        let access = Access::new(
            &mqlb_config::AdminAccess {
                token_file: Some(token),
                allowed_hosts: vec!["mqlb.example".into()],
            },
            "127.0.0.1:9100".parse().expect("addr"),
        )
        .expect("access");
        Fixture {
            rt,
            shared,
            access,
            _balancer: balancer,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = req.parse(data) else {
        return;
    };
    let (Some(method), Some(path)) = (req.method, req.path) else {
        return;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return;
    };
    // hyper hands the handler the URI's path.
    let Ok(uri) = path.parse::<hyper::Uri>() else {
        return;
    };
    let mut map = HeaderMap::new();
    for h in req.headers.iter() {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) {
            map.append(n, v);
        }
    }
    let f = fixture();
    let _in_runtime = f.rt.enter();
    let authorised = map
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| t.trim() == TOKEN);
    match f.access.check(&method, uri.path(), &map) {
        Ok(()) => {
            let before: Vec<bool> = f
                .shared
                .backends
                .snapshot()
                .iter()
                .map(|b| b.is_draining())
                .collect();
            let _ = mqlb_balancer::admin::route(&method, uri.path(), &f.shared);
            let after: Vec<bool> = f
                .shared
                .backends
                .snapshot()
                .iter()
                .map(|b| b.is_draining())
                .collect();
            assert!(authorised || before == after, "drained without the token");
        }
        Err(reply) => assert!(
            reply.status == StatusCode::UNAUTHORIZED || reply.status == StatusCode::FORBIDDEN,
            "{}",
            reply.status
        ),
    }
});
