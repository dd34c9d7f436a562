//! The official Azure IoT Operations SDK (`azure_iot_operations_services`,
//! features `state_store` and `leased_lock`) as the client of the bundled
//! broker's state store: set, get, del, vdel, NX/NEX, PX expiry, key
//! notifications, and two lease holders contending for one leased lock.

#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::string_slice,
    clippy::expect_used
)]

use std::sync::Arc;
use std::time::Duration;

use azure_iot_operations_mqtt::aio::connection_settings::MqttConnectionSettingsBuilder;
use azure_iot_operations_mqtt::session::{Session, SessionExitHandle, SessionOptionsBuilder};
use azure_iot_operations_protocol::application::ApplicationContextBuilder;
use azure_iot_operations_services::leased_lock::lease;
use azure_iot_operations_services::state_store::{self, SetCondition, SetOptions};
use mqlb_tests::OurBroker;

const T: Duration = Duration::from_secs(10);

/// An SDK session to the broker on `port`, running in the background, and
/// a state store client on it.
fn sdk(port: u16, client_id: &str) -> (SessionExitHandle, Arc<state_store::Client>) {
    let settings = MqttConnectionSettingsBuilder::default()
        .client_id(client_id.to_string())
        .hostname("127.0.0.1".to_string())
        .tcp_port(port)
        .use_tls(false)
        .clean_start(true)
        .build()
        .unwrap();
    let session = Session::new(
        SessionOptionsBuilder::default()
            .connection_settings(settings)
            .build()
            .unwrap(),
    )
    .unwrap();
    let exit = session.create_exit_handle();
    let client = state_store::Client::new(
        ApplicationContextBuilder::default().build().unwrap(),
        session.create_managed_client(),
        session.create_session_monitor(),
        state_store::ClientOptionsBuilder::default()
            .build()
            .unwrap(),
    )
    .unwrap();
    tokio::spawn(session.run());
    (exit, Arc::new(client))
}

fn options(condition: SetCondition, expires: Option<Duration>) -> SetOptions {
    SetOptions {
        set_condition: condition,
        expires,
        ..SetOptions::default()
    }
}

/// A 3-node bundled cluster with the balancer in front: its MQTT port.
async fn cluster_behind_the_balancer() -> (
    mqlb_tests::cluster::TestCluster,
    mqlb_tests::RunningBalancer,
) {
    let mut c = mqlb_tests::cluster::TestCluster::start(3, &[]);
    assert!(c.wait_converged(Duration::from_secs(30)).await);
    let backends: Vec<(&str, String)> = c
        .nodes
        .iter()
        .map(|n| (n.name.as_str(), n.addr.clone()))
        .collect();
    let lb = mqlb_tests::RunningBalancer::start(mqlb_tests::config(&backends, "")).await;
    (c, lb)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_sdk_sets_gets_deletes_and_observes() {
    let b = OurBroker::start().await;
    sets_gets_deletes_and_observes(b.addr.port()).await;
}

/// The same against the cluster through the balancer: the SDK's client
/// lands on its session's node, and its keys live on theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_sdk_against_the_cluster() {
    let (_c, lb) = cluster_behind_the_balancer().await;
    sets_gets_deletes_and_observes(lb.addr.port()).await;
}

async fn sets_gets_deletes_and_observes(port: u16) {
    let (exit, c) = sdk(port, "sdk-basic");
    let k = |s: &str| s.as_bytes().to_vec();
    let always = || options(SetCondition::Unconditional, None);
    assert!(
        c.set(k("k"), k("v1"), T, None, always())
            .await
            .unwrap()
            .response
    );
    let got = c.get(k("k"), T).await.unwrap();
    assert_eq!(got.response, Some(k("v1")));
    assert!(got.version.is_some(), "no version");
    // NX and NEX.
    let nx = options(SetCondition::OnlyIfDoesNotExist, None);
    assert!(
        !c.set(k("k"), k("v2"), T, None, nx.clone())
            .await
            .unwrap()
            .response
    );
    let nex = options(SetCondition::OnlyIfEqualOrDoesNotExist, None);
    assert!(
        !c.set(k("k"), k("v2"), T, None, nex.clone())
            .await
            .unwrap()
            .response
    );
    assert!(c.set(k("k"), k("v1"), T, None, nex).await.unwrap().response);
    assert!(
        c.set(k("fresh"), k("x"), T, None, nx)
            .await
            .unwrap()
            .response
    );
    // VDEL and DEL.
    assert_eq!(
        c.vdel(k("k"), k("other"), None, T).await.unwrap().response,
        -1
    );
    assert_eq!(c.vdel(k("k"), k("v1"), None, T).await.unwrap().response, 1);
    assert_eq!(c.del(k("fresh"), None, T).await.unwrap().response, 1);
    assert_eq!(c.del(k("fresh"), None, T).await.unwrap().response, 0);
    assert_eq!(c.get(k("k"), T).await.unwrap().response, None);
    // Notifications, and PX expiry heard as a delete.
    let mut observed = c.observe(k("watched"), T).await.unwrap().response;
    let px = options(
        SetCondition::Unconditional,
        Some(Duration::from_millis(400)),
    );
    assert!(
        c.set(k("watched"), k("w"), T, None, px)
            .await
            .unwrap()
            .response
    );
    let (n, _) = tokio::time::timeout(T, observed.recv_notification())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n.key, k("watched"));
    assert_eq!(n.operation, state_store::Operation::Set(k("w")));
    let (n, _) = tokio::time::timeout(T, observed.recv_notification())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(n.operation, state_store::Operation::Del);
    assert_eq!(c.get(k("watched"), T).await.unwrap().response, None);
    assert!(c.unobserve(k("watched"), T).await.unwrap().response);
    let _ = c.shutdown().await;
    let _ = exit.try_exit();
}

/// Two holders contend for one lease: exactly one holds it at a time; when
/// the first's lease expires the second takes it, and the first's write
/// with its old fencing token is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_lease_holders_and_a_fenced_write() {
    let b = OurBroker::start().await;
    lease_holders(b.addr.port()).await;
}

/// The same against the cluster through the balancer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_lease_holders_on_the_cluster() {
    let (_c, lb) = cluster_behind_the_balancer().await;
    lease_holders(lb.addr.port()).await;
}

async fn lease_holders(port: u16) {
    use azure_iot_operations_services::leased_lock::ErrorKind as LeaseError;
    use azure_iot_operations_services::state_store::{ErrorKind, ServiceError};
    let (exit_a, ca) = sdk(port, "holder-a");
    let (exit_b, cb) = sdk(port, "holder-b");
    let la = lease::Client::new(ca.clone(), b"the-lease".to_vec(), b"holder-a".to_vec()).unwrap();
    let lb = lease::Client::new(cb.clone(), b"the-lease".to_vec(), b"holder-b".to_vec()).unwrap();
    let lease_for = Duration::from_secs(2);
    let t1 = la.acquire(lease_for, T, None).await.unwrap();
    let refused = lb.acquire(lease_for, T, None).await;
    assert!(
        matches!(
            refused.as_ref().map_err(|e| e.kind()),
            Err(LeaseError::LeaseAlreadyHeld)
        ),
        "{refused:?}"
    );
    assert_eq!(la.get_holder(T).await.unwrap(), Some(b"holder-a".to_vec()));
    let write = |c: Arc<state_store::Client>, v: &'static str, ft| async move {
        c.set(
            b"protected".to_vec(),
            v.as_bytes().to_vec(),
            T,
            ft,
            options(SetCondition::Unconditional, None),
        )
        .await
    };
    assert!(
        write(ca.clone(), "from-a", Some(t1.clone()))
            .await
            .unwrap()
            .response
    );
    // a's lease runs out; b takes it over with a newer token.
    tokio::time::sleep(lease_for + Duration::from_millis(500)).await;
    let t2 = lb.acquire(lease_for, T, None).await.unwrap();
    assert_ne!(t2, t1, "the fencing token did not change");
    assert_eq!(lb.get_holder(T).await.unwrap(), Some(b"holder-b".to_vec()));
    assert!(
        write(cb.clone(), "from-b", Some(t2))
            .await
            .unwrap()
            .response
    );
    let stale = write(ca.clone(), "late-a", Some(t1)).await;
    assert!(
        matches!(
            stale.as_ref().map_err(|e| e.kind()),
            Err(ErrorKind::ServiceError(
                ServiceError::FencingTokenLowerVersion
            ))
        ),
        "{stale:?}"
    );
    assert_eq!(
        cb.get(b"protected".to_vec(), T).await.unwrap().response,
        Some(b"from-b".to_vec())
    );
    lb.release(T).await.unwrap();
    assert_eq!(lb.get_holder(T).await.unwrap(), None);
    let _ = ca.shutdown().await;
    let _ = cb.shutdown().await;
    let _ = exit_a.try_exit();
    let _ = exit_b.try_exit();
}
