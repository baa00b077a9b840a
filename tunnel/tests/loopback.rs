//! The tunnel end to end on loopback: real QUIC, real mutual TLS with device
//! certificates from a CA made in a temporary directory, real TCP services.
//! Every wait is bounded (`support::within`).

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Barrier;
use tokio::task::JoinSet;
use zt_identity::PeerMatcher;
use zt_tunnel::protocol::{decode_header, encode_header};
use zt_tunnel::{
    DecisionKind, DenyReason, ErrorCode, GatewayOptions, OpenAnswer, OpenRequest, SpliceFailure,
    Tuning, TunnelClient, TunnelError, MAX_HEADER_LEN,
};

use support::*;

/// Reads from `caller` until it ends; Ok(bytes) on EOF, Err on reset.
async fn read_until_end(caller: &mut tokio::net::TcpStream) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    caller.read_to_end(&mut out).await.map(|_| out)
}

/// Sends `message` and expects it back (on an echo service).
async fn round_trip(caller: &mut tokio::net::TcpStream, message: &[u8]) {
    caller.write_all(message).await.unwrap();
    let mut back = vec![0u8; message.len()];
    within("echo", caller.read_exact(&mut back)).await.unwrap();
    assert_eq!(back, message);
}

/// The caller's connection was reset (not closed with a FIN).
async fn assert_reset(caller: &mut tokio::net::TcpStream) {
    let read = within("caller reset", read_until_end(caller)).await;
    assert_eq!(
        read.map(|rest| rest.len()).map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset)
    );
}

/// A raw QUIC connection to the gateway with a valid device certificate,
/// for speaking the stream protocol by hand.
async fn raw_connection(pki: &Pki, gateway: &RunningGateway) -> quinn::Connection {
    let device = pki.device("city-a", "pc-raw");
    let quic = zt_tunnel::config::client_config(
        pki.client_tls(&device, &gateway.device.id),
        &Tuning::default(),
    )
    .unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quic);
    within(
        "connect",
        endpoint.connect(gateway.addr, "127.0.0.1").unwrap(),
    )
    .await
    .unwrap()
}

/// Reads the gateway's answer off a raw stream.
async fn raw_answer(recv: &mut quinn::RecvStream) -> OpenAnswer {
    let mut prefix = [0u8; 4];
    within("answer", recv.read_exact(&mut prefix))
        .await
        .unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(prefix) as usize];
    recv.read_exact(&mut body).await.unwrap();
    decode_header(&[&prefix[..], &body].concat()).unwrap()
}

/// Sends `request`, `data` and the end of the stream in one write, without
/// waiting for anything: what a pipelining client sends at its fastest.
async fn raw_pipelined(
    connection: &quinn::Connection,
    request: &OpenRequest,
    data: &[u8],
) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut send, recv) = connection.open_bi().await.unwrap();
    let mut bytes = encode_header(request).unwrap();
    bytes.extend_from_slice(data);
    send.write_all(&bytes).await.unwrap();
    send.finish().unwrap();
    (send, recv)
}

// 1. ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn carries_bytes_both_ways_with_half_close_and_reports_the_caller() {
    init_tracing();
    let pki = Pki::new();
    let mut gateway = RunningGateway::start(&pki).await;
    let mut service = Service::start(Behaviour::ReplyAfterEof).await;
    let (client, device) = gateway.client(&pki, "pc-1");

    let request = request("conn-1", service.addr);
    let stream = within("open", client.open(gateway.addr, &request))
        .await
        .unwrap();
    assert!(stream.answer.allowed);
    assert_eq!(stream.answer.rule_id, ALLOW_RULE);
    assert_eq!(stream.answer.policy_version, 1);
    assert_eq!(
        stream.peer().id,
        gateway.device.id,
        "the gateway's proven identity"
    );
    assert_eq!(stream.gateway(), gateway.addr);
    let (mut caller, agent_side) = tcp_pair().await;
    let splice = tokio::spawn(stream.splice(agent_side));

    // The service answers only after it has read to EOF: the caller's FIN
    // must cross the tunnel while the other direction stays open.
    let body = payload(1, 1 << 20);
    caller.write_all(&body).await.unwrap();
    caller.shutdown().await.unwrap();
    let reply = within("reply", read_until_end(&mut caller)).await.unwrap();
    let mut expected = format!("got {}\n", body.len()).into_bytes();
    expected.extend(body.iter().rev());
    assert!(reply == expected, "reply differs from the expected one");

    let stats = within("splice", splice).await.unwrap().unwrap();
    assert_eq!(stats.tcp_to_tunnel, body.len() as u64);
    assert_eq!(stats.tunnel_to_tcp, expected.len() as u64);
    assert_eq!(
        within("service end", service.ends.recv()).await,
        Some(ServiceEnd::Eof)
    );

    // The policy was asked about this device and this caller.
    let seen = gateway.policy.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0.id, device.id);
    assert_eq!(seen[0].0.serial_hex, device.cert.serial_hex());
    assert_eq!(seen[0].1, request);
    assert_eq!(seen[0].1.user, "alice");
    assert_eq!(seen[0].1.exe_sha256, "ab".repeat(32));

    let decision = gateway.decision().await;
    assert_eq!(decision.kind, DecisionKind::Opened);
    assert_eq!(decision.peer.id, device.id);
    assert_eq!(decision.request, request);
    assert!(decision.authorization.allowed);
    assert_eq!(decision.authorization.rule_id, ALLOW_RULE);
    assert_eq!(decision.peer_addr, client.local_addr().unwrap());
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_echo_is_not_held_back() {
    init_tracing();
    let pki = Pki::new();
    let gateway = RunningGateway::start(&pki).await;
    let service = Service::start(Behaviour::Echo).await;
    let (client, _) = gateway.client(&pki, "pc-1");
    let (mut caller, splice) = within(
        "tunnel",
        tunnel(&client, gateway.addr, &request("c", service.addr)),
    )
    .await
    .unwrap();
    // Small messages, each answered before the next: no batching delay may
    // hold a byte back.
    for i in 0..200u32 {
        round_trip(&mut caller, format!("ping {i}\n").as_bytes()).await;
    }
    caller.shutdown().await.unwrap();
    assert!(within("eof", read_until_end(&mut caller))
        .await
        .unwrap()
        .is_empty());
    within("splice", splice).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_carry_sends_before_the_answer_and_carries_both_ways_with_half_close() {
    init_tracing();
    let pki = Pki::new();
    let mut gateway = RunningGateway::start(&pki).await;
    let mut service = Service::start(Behaviour::ReplyAfterEof).await;
    let (client, device) = gateway.client(&pki, "pc-1");

    // The caller's first bytes are there when the request goes; the rest
    // (1 MiB, far more than may go before the answer) and its FIN follow
    // without waiting for anything.
    let request = request("conn-1", service.addr);
    let body = payload(1, 1 << 20);
    let carried = carried(
        &client,
        gateway.addr,
        Some(gateway.device.id.clone()),
        request.clone(),
        &body[..1000],
    )
    .await;
    let (mut read, mut write) = carried.caller.into_split();
    let rest = body[1000..].to_vec();
    let writer = tokio::spawn(async move {
        write.write_all(&rest).await.unwrap();
        write.shutdown().await.unwrap();
        write
    });

    let (told, _) = within("answer", carried.told).await.unwrap();
    let (answer, peer) = told.unwrap();
    assert!(answer.allowed);
    assert_eq!(answer.rule_id, ALLOW_RULE);
    assert_eq!(answer.policy_version, 1);
    assert_eq!(peer.id, gateway.device.id, "the gateway's proven identity");

    // The service answers only after it has read to EOF.
    let mut reply = Vec::new();
    within("reply", read.read_to_end(&mut reply)).await.unwrap();
    let mut expected = format!("got {}\n", body.len()).into_bytes();
    expected.extend(body.iter().rev());
    assert!(reply == expected, "reply differs from the expected one");
    let _write = within("writer", writer).await.unwrap();

    let stats = within("carry", carried.task).await.unwrap().unwrap();
    assert_eq!(stats.tcp_to_tunnel, body.len() as u64);
    assert_eq!(stats.tunnel_to_tcp, expected.len() as u64);
    assert_eq!(
        within("service end", service.ends.recv()).await,
        Some(ServiceEnd::Eof)
    );
    let seen = gateway.policy.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].0.id, device.id);
    assert_eq!(seen[0].1, request);
    let decision = gateway.decision().await;
    assert_eq!(decision.kind, DecisionKind::Opened);
    assert_eq!(decision.request, request);
    assert_eq!(client.live_streams(), 0);
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_answer_is_told_before_the_first_byte_comes_back() {
    init_tracing();
    let pki = Pki::new();
    let gateway = RunningGateway::start(&pki).await;
    let service = Service::start(Behaviour::Echo).await;
    let (client, _) = gateway.client(&pki, "pc-1");
    // Warm the pooled connection, then time a pipelined echo on it.
    for id in ["cold", "warm"] {
        let mut carried = carried(
            &client,
            gateway.addr,
            None,
            request(id, service.addr),
            b"ping 0\n",
        )
        .await;
        let mut back = [0u8; 7];
        within("echo", carried.caller.read_exact(&mut back))
            .await
            .unwrap();
        let first_byte_at = Instant::now();
        assert_eq!(&back, b"ping 0\n");
        let (told, told_at) = within("answer", carried.told).await.unwrap();
        assert!(told.unwrap().0.allowed);
        assert!(
            told_at <= first_byte_at,
            "the answer must be reported before the first byte reaches the caller"
        );
        // Small messages, each answered before the next: no batching delay
        // may hold a byte back.
        for i in 1..100u32 {
            round_trip(&mut carried.caller, format!("ping {i}\n").as_bytes()).await;
        }
        carried.caller.shutdown().await.unwrap();
        assert!(within("eof", read_until_end(&mut carried.caller))
            .await
            .unwrap()
            .is_empty());
        within("carry", carried.task).await.unwrap().unwrap();
    }
    assert_eq!(client.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_data_reaches_the_service_once_and_only_after_the_answer() {
    init_tracing();
    let pki = Pki::new();
    let gateway = RunningGateway::start(&pki).await;
    let mut service = Service::start(Behaviour::Echo).await;
    let connection = raw_connection(&pki, &gateway).await;
    let data = payload(3, 48 * 1024);
    let (_send, mut recv) = raw_pipelined(&connection, &request("raw", service.addr), &data).await;
    // The answer comes first, then the service's echo of exactly what was
    // sent, once, then its end.
    assert!(raw_answer(&mut recv).await.allowed);
    let echoed = within("echo", recv.read_to_end(1 << 20)).await.unwrap();
    assert!(echoed == data, "echo differs from what was sent");
    assert_eq!(
        within("service end", service.ends.recv()).await,
        Some(ServiceEnd::Eof)
    );
    assert_eq!(service.accepted(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_target_overrides_the_destination() {
    init_tracing();
    let pki = Pki::new();
    let gateway = RunningGateway::start(&pki).await;
    let service = Service::start(Behaviour::Echo).await;
    *gateway.policy.target.lock().unwrap() = Some(service.addr);
    let (client, _) = gateway.client(&pki, "pc-1");
    // A published name the gateway maps to the real service.
    let published = "192.0.2.10:443".parse().unwrap();
    let (mut caller, _splice) = within(
        "tunnel",
        tunnel(&client, gateway.addr, &request("c", published)),
    )
    .await
    .unwrap();
    round_trip(&mut caller, b"hello").await;
    assert_eq!(service.accepted(), 1);
}

// 2. ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_request_reports_rule_and_reason_and_never_reaches_the_service() {
    init_tracing();
    let pki = Pki::new();
    let mut gateway = RunningGateway::start(&pki).await;
    let service = Service::start(Behaviour::Echo).await;
    let (client, device) = gateway.client(&pki, "pc-1");
    gateway.policy.deny("conn-denied");

    let error = within(
        "open",
        client.open(gateway.addr, &request("conn-denied", service.addr)),
    )
    .await
    .unwrap_err();
    match &error {
        TunnelError::Denied {
            reason,
            rule_id,
            detail,
            policy_version,
        } => {
            assert_eq!(*reason, DenyReason::Policy);
            assert_eq!(rule_id, DENY_RULE);
            assert_eq!(detail, "test says no");
            assert_eq!(*policy_version, 2);
        }
        other => panic!("expected a denial, got {other}"),
    }
    assert!(error.is_denied());

    let decision = gateway.decision().await;
    assert_eq!(decision.kind, DecisionKind::Refused);
    assert_eq!(decision.peer.id, device.id);
    assert_eq!(decision.request.connection_id, "conn-denied");
    assert_eq!(decision.authorization.reason, DenyReason::Policy);

    // Pipelined: the caller's bytes go out before the answer, and go no
    // further than the gateway, which discards them; the caller is reset.
    let early = payload(2, 16 * 1024);
    let mut carried = carried(
        &client,
        gateway.addr,
        None,
        request("conn-denied", service.addr),
        &early,
    )
    .await;
    let error = within("carry", carried.task).await.unwrap().unwrap_err();
    assert!(
        matches!(&error, TunnelError::Denied { reason: DenyReason::Policy, rule_id, .. }
            if rule_id == DENY_RULE),
        "expected a denial, got {error}"
    );
    let (told, _) = within("answer", carried.told).await.unwrap();
    assert_eq!(told.unwrap_err(), error.to_string());
    assert_reset(&mut carried.caller).await;
    assert_eq!(gateway.decision().await.kind, DecisionKind::Refused);
    assert_eq!(client.live_streams(), 0);

    // The same by hand, at the fastest: request, data and FIN in one go.
    let connection = raw_connection(&pki, &gateway).await;
    let (_send, mut recv) =
        raw_pipelined(&connection, &request("conn-denied", service.addr), &early).await;
    let answer = raw_answer(&mut recv).await;
    assert!(!answer.allowed);
    assert_eq!(answer.reason(), DenyReason::Policy);
    // The gateway's side ends right after the answer.
    assert!(within("end", recv.read_to_end(1024))
        .await
        .unwrap()
        .is_empty());
    assert_eq!(gateway.decision().await.kind, DecisionKind::Refused);
    connection.close(0u32.into(), b"done");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        service.accepted(),
        0,
        "no refused request reached the service"
    );

    // The same connection still serves allowed requests.
    let (mut caller, _splice) = within(
        "tunnel",
        tunnel(&client, gateway.addr, &request("conn-ok", service.addr)),
    )
    .await
    .unwrap();
    round_trip(&mut caller, b"still fine").await;
    assert_eq!(service.accepted(), 1, "only the allowed request connected");
    assert_eq!(client.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_service_is_a_refusal_with_the_allowing_rule() {
    init_tracing();
    let pki = Pki::new();
    let mut gateway = RunningGateway::start(&pki).await;
    let (client, _) = gateway.client(&pki, "pc-1");
    // A port nothing listens on.
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let error = within("open", client.open(gateway.addr, &request("c", closed)))
        .await
        .unwrap_err();
    match error {
        TunnelError::Denied {
            reason, rule_id, ..
        } => {
            assert_eq!(reason, DenyReason::ServiceUnreachable);
            assert_eq!(rule_id, ALLOW_RULE);
        }
        other => panic!("expected a refusal, got {other}"),
    }
    let decision = gateway.decision().await;
    assert_eq!(decision.kind, DecisionKind::Refused);
    assert_eq!(
        decision.authorization.reason,
        DenyReason::ServiceUnreachable
    );

    // Pipelined, with bytes sent before the answer: the same refusal, and
    // the caller is reset.
    let mut carried = carried(&client, gateway.addr, None, request("c", closed), b"hello").await;
    let error = within("carry", carried.task).await.unwrap().unwrap_err();
    assert!(
        matches!(&error, TunnelError::Denied { reason: DenyReason::ServiceUnreachable, rule_id, .. }
            if rule_id == ALLOW_RULE),
        "expected a refusal, got {error}"
    );
    assert!(within("answer", carried.told).await.unwrap().0.is_err());
    assert_reset(&mut carried.caller).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_carry_checks_the_gateways_identity_before_opening_a_stream() {
    init_tracing();
    let pki = Pki::new();
    let mut gateway = RunningGateway::start(&pki).await;
    let service = Service::start(Behaviour::Echo).await;
    let (client, _) = gateway.client(&pki, "pc-1");
    // The expected gateway: through.
    let mut ok = carried(
        &client,
        gateway.addr,
        Some(gateway.device.id.clone()),
        request("ok", service.addr),
        b"",
    )
    .await;
    round_trip(&mut ok.caller, b"hi").await;
    assert_eq!(gateway.decision().await.kind, DecisionKind::Opened);

    // A route that expects another gateway on that address: refused on
    // the pooled connection, before a stream is opened.
    let other = pki.device("city-a", "gateway-2").id;
    let mut wrong = carried(
        &client,
        gateway.addr,
        Some(other.clone()),
        request("wrong", service.addr),
        b"secret",
    )
    .await;
    let error = within("carry", wrong.task).await.unwrap().unwrap_err();
    match &error {
        TunnelError::UnexpectedPeer {
            gateway: addr,
            expected,
            presented,
        } => {
            assert_eq!(*addr, gateway.addr);
            assert_eq!(**expected, other);
            assert_eq!(**presented, gateway.device.id);
        }
        other => panic!("expected an identity mismatch, got {other}"),
    }
    let (told, _) = within("answer", wrong.told).await.unwrap();
    assert_eq!(told.unwrap_err(), error.to_string());
    assert_reset(&mut wrong.caller).await;
    // The gateway got nothing: no request, no question to its policy.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(gateway.decisions.try_recv().is_err(), "unexpected decision");
    assert_eq!(gateway.policy.seen().len(), 1);
    assert_eq!(gateway.handle.live_streams(), 1, "only the allowed stream");
    assert_eq!(service.accepted(), 1);
    round_trip(&mut ok.caller, b"unaffected").await;
}

// 3. ------------------------------------------------------------------------

/// No decision, and no question to the policy, within a short while.
async fn assert_no_decision(gateway: &mut RunningGateway) {
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(gateway.decisions.try_recv().is_err(), "unexpected decision");
    assert!(gateway.policy.seen().is_empty(), "the policy was asked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_from_another_ca_is_refused_at_the_handshake() {
    init_tracing();
    let pki = Pki::new();
    let mut gateway = RunningGateway::start(&pki).await;
    let service = Service::start(Behaviour::Echo).await;
    // Same trust domain name, different CA: the gateway must not accept it.
    let other = Pki::new();
    let intruder = other.device("city-a", "pc-1");
    let tls = zt_identity::tls::spiffe_client_config(
        &pki.ca.bundle_der(), // it trusts our gateway
        vec![intruder.cert.der.clone()],
        intruder.key.private_key_der(),
        PeerMatcher::Exact(gateway.device.id.clone()),
        None,
    )
    .unwrap();
    let client = TunnelClient::new("127.0.0.1:0".parse().unwrap(), tls).unwrap();
    let error = within(
        "open",
        client.open(gateway.addr, &request("c", service.addr)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(error, TunnelError::Handshake { .. }),
        "expected a handshake failure, got {error}"
    );
    assert_no_decision(&mut gateway).await;
    assert_eq!(service.accepted(), 0);
    assert_eq!(gateway.handle.connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_device_is_refused_at_the_handshake() {
    init_tracing();
    let pki = Pki::new();
    let mut gateway = RunningGateway::start(&pki).await;
    let service = Service::start(Behaviour::Echo).await;
    let (by_id, device) = gateway.client(&pki, "pc-revoked");
    let (by_serial, other_device) = gateway.client(&pki, "pc-old-cert");
    {
        let mut list = gateway.revocations.write().unwrap();
        list.revoke_device(&device.id);
        list.revoke_serial(&other_device.cert.serial);
    }
    for client in [by_id, by_serial] {
        let error = within(
            "open",
            client.open(gateway.addr, &request("c", service.addr)),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(error, TunnelError::Handshake { .. }),
            "expected a handshake failure, got {error}"
        );
        assert_eq!(client.connections(), 0);
    }
    assert_no_decision(&mut gateway).await;
    assert_eq!(service.accepted(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_refuses_a_gateway_with_another_identity() {
    init_tracing();
    let pki = Pki::new();
    let mut gateway = RunningGateway::start(&pki).await;
    let device = pki.device("city-a", "pc-1");
    let impostor_id = pki.device("city-a", "gateway-2").id;
    let client = TunnelClient::new(
        "127.0.0.1:0".parse().unwrap(),
        pki.client_tls(&device, &impostor_id),
    )
    .unwrap();
    let error = within(
        "open",
        client.open(gateway.addr, &request("c", "127.0.0.1:9".parse().unwrap())),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(error, TunnelError::Handshake { .. }),
        "expected a handshake failure, got {error}"
    );
    assert_no_decision(&mut gateway).await;
}

// 4. ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_streams_share_one_connection() {
    const STREAMS: usize = 1000;
    const SIZE: usize = 64 * 1024;
    init_tracing();
    let pki = Pki::new();
    let mut gateway = RunningGateway::start(&pki).await;
    let service = Service::start(Behaviour::Echo).await;
    let (client, _) = gateway.client(&pki, "pc-1");

    // Everyone opens at once on a cold client (the connection is made once),
    // pipelined as the agent does, each caller's first kilobyte sent before
    // the answer; all wait until every stream is allowed, then exchange the
    // rest of their payload.
    const EARLY: usize = 1024;
    let opened = Arc::new(Barrier::new(STREAMS + 1));
    let go = Arc::new(Barrier::new(STREAMS + 1));
    let mut tasks = JoinSet::new();
    for i in 0..STREAMS {
        let (client, opened, go) = (client.clone(), Arc::clone(&opened), Arc::clone(&go));
        let (gateway_addr, service_addr) = (gateway.addr, service.addr);
        tasks.spawn(async move {
            let request = request(&format!("conn-{i}"), service_addr);
            let data = payload(i as u64, SIZE);
            let carried = carried(&client, gateway_addr, None, request, &data[..EARLY]).await;
            let (told, _) = carried.told.await.unwrap();
            assert!(told.unwrap().0.allowed, "stream {i} refused");
            opened.wait().await;
            go.wait().await;
            let (mut read, mut write) = carried.caller.into_split();
            let send = async {
                write.write_all(&data[EARLY..]).await.unwrap();
                write.shutdown().await.unwrap();
            };
            let receive = async {
                let mut back = Vec::with_capacity(SIZE);
                read.read_to_end(&mut back).await.map(|_| back)
            };
            let ((), back) = tokio::join!(send, receive);
            let back = match back {
                Ok(back) => back,
                // Name the tunnel's side of the failure.
                Err(err) => panic!(
                    "stream {i}: the caller's read failed ({err}); the carrying task: {:?}",
                    carried.task.await
                ),
            };
            assert_eq!(back.len(), SIZE, "stream {i} lost bytes");
            assert_eq!(sha256(&back), sha256(&data), "stream {i} corrupted");
            let stats = carried.task.await.unwrap().unwrap();
            assert_eq!(stats.tcp_to_tunnel, SIZE as u64);
            assert_eq!(stats.tunnel_to_tcp, SIZE as u64);
        });
    }
    within("all streams open", opened.wait()).await;
    assert_eq!(client.connections(), 1);
    assert_eq!(client.live_streams(), STREAMS);
    assert_eq!(gateway.handle.connections(), 1);
    assert_eq!(gateway.handle.live_streams(), STREAMS);
    go.wait().await;
    within("all streams done", async {
        while let Some(done) = tasks.join_next().await {
            done.unwrap();
        }
    })
    .await;
    assert_eq!(client.connections(), 1);
    assert_eq!(service.accepted(), STREAMS);
    let mut opened_decisions = 0;
    while let Ok(decision) = gateway.decisions.try_recv() {
        assert_eq!(decision.kind, DecisionKind::Opened);
        opened_decisions += 1;
    }
    assert_eq!(opened_decisions, STREAMS);
    assert_eq!(gateway.handle.dropped_decisions(), 0);
}

// 5. ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reevaluation_closes_only_streams_no_longer_allowed() {
    init_tracing();
    let pki = Pki::new();
    let mut gateway = RunningGateway::start(&pki).await;
    let mut service = Service::start(Behaviour::Echo).await;
    let (client, device) = gateway.client(&pki, "pc-1");
    let (mut doomed, doomed_splice) = within(
        "tunnel",
        tunnel(&client, gateway.addr, &request("doomed", service.addr)),
    )
    .await
    .unwrap();
    let (mut kept, _kept_splice) = within(
        "tunnel",
        tunnel(&client, gateway.addr, &request("kept", service.addr)),
    )
    .await
    .unwrap();
    round_trip(&mut doomed, b"before").await;
    round_trip(&mut kept, b"before").await;
    for _ in 0..2 {
        assert_eq!(gateway.decision().await.kind, DecisionKind::Opened);
    }

    assert_eq!(gateway.handle.reevaluate(), 0, "nothing changed yet");
    gateway.policy.deny("doomed");
    assert_eq!(gateway.handle.reevaluate(), 1);

    // The caller's connection is torn down promptly (reset, or at least EOF).
    let ended = within("caller teardown", read_until_end(&mut doomed)).await;
    assert!(
        ended.as_ref().map_or(true, |rest| rest.is_empty()),
        "unexpected data after the policy closed the stream: {ended:?}"
    );
    let failure = within("client splice", doomed_splice)
        .await
        .unwrap()
        .unwrap_err()
        .failure;
    assert!(
        matches!(failure, SpliceFailure::PeerReset(code) if code == ErrorCode::PolicyClosed.varint()),
        "unexpected client splice end: {failure}"
    );
    // The service side of that connection is closed too (reset).
    assert_eq!(
        within("service end", service.ends.recv()).await,
        Some(ServiceEnd::Error(std::io::ErrorKind::ConnectionReset))
    );

    let decision = gateway.decision().await;
    assert_eq!(decision.kind, DecisionKind::ClosedByPolicy);
    assert_eq!(decision.request.connection_id, "doomed");
    assert_eq!(decision.peer.id, device.id);
    assert_eq!(decision.authorization.rule_id, DENY_RULE);

    round_trip(&mut kept, b"after").await;
    assert_eq!(gateway.handle.live_streams(), 1);
    assert_eq!(client.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reevaluation_closes_the_connections_of_a_revoked_peer() {
    init_tracing();
    let pki = Pki::new();
    let mut gateway = RunningGateway::start(&pki).await;
    let service = Service::start(Behaviour::Echo).await;
    let (revoked_client, revoked) = gateway.client(&pki, "pc-stolen");
    let (good_client, _) = gateway.client(&pki, "pc-1");
    let mut revoked_callers = Vec::new();
    for i in 0..2 {
        let (mut caller, _) = within(
            "tunnel",
            tunnel(
                &revoked_client,
                gateway.addr,
                &request(&format!("r{i}"), service.addr),
            ),
        )
        .await
        .unwrap();
        round_trip(&mut caller, b"hi").await;
        revoked_callers.push(caller);
    }
    let (mut good, _) = within(
        "tunnel",
        tunnel(&good_client, gateway.addr, &request("g", service.addr)),
    )
    .await
    .unwrap();
    round_trip(&mut good, b"hi").await;
    assert_eq!(gateway.handle.connections(), 2);

    // A revocation arrives (in the verifier's list and in the policy).
    gateway
        .revocations
        .write()
        .unwrap()
        .revoke_device(&revoked.id);
    gateway.policy.revoke(&revoked.id);
    assert_eq!(gateway.handle.reevaluate(), 2);

    for caller in &mut revoked_callers {
        let ended = within("caller teardown", read_until_end(caller)).await;
        assert!(ended.map_or(true, |rest| rest.is_empty()));
    }
    within("revoked connection closed", async {
        while revoked_client.connections() != 0 || gateway.handle.connections() != 1 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // It cannot come back: the handshake now fails.
    let error = within(
        "reopen",
        revoked_client.open(gateway.addr, &request("r-again", service.addr)),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(error, TunnelError::Handshake { .. }),
        "expected a handshake failure, got {error}"
    );
    round_trip(&mut good, b"unaffected").await;
    let closed: Vec<_> = std::iter::from_fn(|| gateway.decisions.try_recv().ok())
        .filter(|d| d.kind == DecisionKind::ClosedByPolicy)
        .collect();
    assert_eq!(closed.len(), 2);
    assert!(closed
        .iter()
        .all(|d| d.peer.id == revoked.id && d.authorization.reason == DenyReason::Revoked));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reevaluation_closes_its_own_streams() {
    init_tracing();
    let pki = Pki::new();
    let gateway = RunningGateway::start(&pki).await;
    let mut service = Service::start(Behaviour::Echo).await;
    let (client, _) = gateway.client(&pki, "pc-1");
    let mut doomed_request = request("doomed", service.addr);
    doomed_request.rule_id = "old-rule".into();
    let (mut doomed, doomed_splice) =
        within("tunnel", tunnel(&client, gateway.addr, &doomed_request))
            .await
            .unwrap();
    let (mut kept, _kept_splice) = within(
        "tunnel",
        tunnel(&client, gateway.addr, &request("kept", service.addr)),
    )
    .await
    .unwrap();
    round_trip(&mut doomed, b"x").await;
    round_trip(&mut kept, b"x").await;

    assert_eq!(client.reevaluate(|r| r.rule_id != "old-rule"), 1);
    let failure = within("splice", doomed_splice)
        .await
        .unwrap()
        .unwrap_err()
        .failure;
    assert!(matches!(
        failure,
        SpliceFailure::Aborted(ErrorCode::PolicyClosed)
    ));
    // The caller is reset, and so is the service connection on the far side.
    let read = within("caller teardown", read_until_end(&mut doomed)).await;
    assert_eq!(
        read.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionReset
    );
    assert_eq!(
        within("service end", service.ends.recv()).await,
        Some(ServiceEnd::Error(std::io::ErrorKind::ConnectionReset))
    );
    round_trip(&mut kept, b"still here").await;
    assert_eq!(client.live_streams(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_gateways_connection_is_closed_by_the_client() {
    init_tracing();
    let pki = Pki::new();
    let gateway = RunningGateway::start(&pki).await;
    let mut service = Service::start(Behaviour::Echo).await;
    let (client, _) = gateway.client(&pki, "pc-1");
    let (mut caller, splice) = within(
        "tunnel",
        tunnel(&client, gateway.addr, &request("live", service.addr)),
    )
    .await
    .unwrap();
    round_trip(&mut caller, b"before").await;
    assert_eq!(client.connections(), 1);

    // Another gateway's revocation changes nothing.
    assert_eq!(
        client.close_gateways(|peer| peer.id.to_string().ends_with("/other")),
        0
    );
    round_trip(&mut caller, b"still").await;

    // The gateway's own: its connection goes, and the stream with it.
    let gateway_id = gateway.device.id.clone();
    assert_eq!(client.close_gateways(|peer| peer.id == gateway_id), 1);
    assert_eq!(client.connections(), 0);
    assert!(within("splice", splice).await.unwrap().is_err());
    assert_reset(&mut caller).await;
    // The gateway's side of it ends too (the service sees the tunnel go).
    assert!(within("service end", service.ends.recv()).await.is_some());
    // A new stream needs a new connection (checked anew at its handshake).
    let (mut again, _splice) = within(
        "tunnel",
        tunnel(&client, gateway.addr, &request("again", service.addr)),
    )
    .await
    .unwrap();
    round_trip(&mut again, b"new connection").await;
    assert_eq!(client.connections(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reevaluation_closes_a_pipelined_connection_still_waiting_for_its_answer() {
    init_tracing();
    let pki = Pki::new();
    let gateway = RunningGateway::start(&pki).await;
    let service = Service::start(Behaviour::Echo).await;
    let (client, _) = gateway.client(&pki, "pc-1");
    let slow = Duration::from_millis(1500);
    gateway
        .policy
        .slow
        .lock()
        .unwrap()
        .insert("slow".into(), slow);
    let mut carried = carried(
        &client,
        gateway.addr,
        None,
        request("slow", service.addr),
        b"early",
    )
    .await;
    // The gateway is deciding (slowly); the client's stream is registered.
    within("deciding", async {
        while client.live_streams() == 0 || gateway.policy.seen().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let start = Instant::now();
    assert_eq!(client.reevaluate(|r| r.connection_id != "slow"), 1);
    let error = within("carry", carried.task).await.unwrap().unwrap_err();
    assert!(
        matches!(error, TunnelError::Aborted(ErrorCode::PolicyClosed)),
        "unexpected: {error}"
    );
    assert!(start.elapsed() < slow / 2, "not closed before the answer");
    let (told, _) = within("answer", carried.told).await.unwrap();
    assert_eq!(told.unwrap_err(), error.to_string());
    assert_reset(&mut carried.caller).await;
    assert_eq!(client.live_streams(), 0);
}

// 6. ------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_headers_reset_only_their_stream() {
    init_tracing();
    let pki = Pki::new();
    let gateway = RunningGateway::start(&pki).await;
    let service = Service::start(Behaviour::Echo).await;
    let device = pki.device("city-a", "pc-raw");

    // A raw QUIC client with a valid certificate, speaking nonsense.
    let quic = zt_tunnel::config::client_config(
        pki.client_tls(&device, &gateway.device.id),
        &Tuning::default(),
    )
    .unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quic);
    let connection = within(
        "connect",
        endpoint.connect(gateway.addr, "127.0.0.1").unwrap(),
    )
    .await
    .unwrap();

    let oversized = (MAX_HEADER_LEN as u32 + 1).to_be_bytes().to_vec();
    let mut garbage = 8u32.to_be_bytes().to_vec();
    garbage.extend_from_slice(&[0xff; 8]);
    let mut truncated = 100u32.to_be_bytes().to_vec();
    truncated.extend_from_slice(b"short");
    let huge = u32::MAX.to_be_bytes().to_vec();
    for (what, bytes) in [
        ("oversized", oversized),
        ("garbage", garbage),
        ("truncated", truncated),
        ("huge", huge),
    ] {
        let (mut send, mut recv) = connection.open_bi().await.unwrap();
        send.write_all(&bytes).await.unwrap();
        send.finish().unwrap();
        let error = within(what, recv.read_to_end(1024)).await.unwrap_err();
        assert!(
            matches!(
                &error,
                quinn::ReadToEndError::Read(quinn::ReadError::Reset(code))
                    if *code == ErrorCode::Protocol.varint()
            ),
            "{what}: expected a reset with the protocol error code, got {error}"
        );
    }

    // The same connection still gets a proper answer to a proper request.
    let (mut send, mut recv) = connection.open_bi().await.unwrap();
    send.write_all(&encode_header(&request("ok", service.addr)).unwrap())
        .await
        .unwrap();
    let mut prefix = [0u8; 4];
    within("answer", recv.read_exact(&mut prefix))
        .await
        .unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(prefix) as usize];
    recv.read_exact(&mut body).await.unwrap();
    let answer: OpenAnswer = decode_header(&[&prefix[..], &body].concat()).unwrap();
    assert!(answer.allowed);
    send.write_all(b"raw bytes").await.unwrap();
    let mut echo = [0u8; 9];
    within("echo", recv.read_exact(&mut echo)).await.unwrap();
    assert_eq!(&echo, b"raw bytes");

    // And other clients are served.
    let (client, _) = gateway.client(&pki, "pc-1");
    let (mut caller, _) = within(
        "tunnel",
        tunnel(&client, gateway.addr, &request("c", service.addr)),
    )
    .await
    .unwrap();
    round_trip(&mut caller, b"fine").await;
}

// Resilience ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_reset_resets_the_service_connection() {
    init_tracing();
    let pki = Pki::new();
    let gateway = RunningGateway::start(&pki).await;
    let mut service = Service::start(Behaviour::Hold).await;
    let (client, _) = gateway.client(&pki, "pc-1");
    let (caller, splice) = within(
        "tunnel",
        tunnel(&client, gateway.addr, &request("c", service.addr)),
    )
    .await
    .unwrap();
    within("service accept", async {
        while service.accepted() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    zt_tunnel::reset(caller);
    let failure = within("splice", splice).await.unwrap().unwrap_err().failure;
    assert!(
        matches!(failure, SpliceFailure::Tcp(_)),
        "unexpected: {failure}"
    );
    assert_eq!(
        within("service end", service.ends.recv()).await,
        Some(ServiceEnd::Error(std::io::ErrorKind::ConnectionReset))
    );
}

/// A `carry` dropped half-way (its task aborted) resets both ends: a request
/// cut short must not reach the service looking complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_carry_resets_both_ends() {
    init_tracing();
    let pki = Pki::new();
    let gateway = RunningGateway::start(&pki).await;
    let mut service = Service::start(Behaviour::Hold).await;
    let (client, _) = gateway.client(&pki, "pc-1");
    let mut carried = carried(
        &client,
        gateway.addr,
        None,
        request("c", service.addr),
        b"half a request",
    )
    .await;
    let (told, _) = within("answer", carried.told).await.unwrap();
    assert!(told.unwrap().0.allowed);
    within("service accept", async {
        while service.accepted() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    carried.task.abort();
    assert_eq!(
        within("service end", service.ends.recv()).await,
        Some(ServiceEnd::Error(std::io::ErrorKind::ConnectionReset))
    );
    assert_reset(&mut carried.caller).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_connection_is_replaced_after_a_gateway_restart() {
    init_tracing();
    let pki = Pki::new();
    let gateway = RunningGateway::start(&pki).await;
    let addr = gateway.addr;
    let service = Service::start(Behaviour::Echo).await;
    let (client, _) = gateway.client(&pki, "pc-1");
    let (mut caller, _) = within("tunnel", tunnel(&client, addr, &request("a", service.addr)))
        .await
        .unwrap();
    round_trip(&mut caller, b"first").await;

    // Restart on the same address with the same identity (a fresh
    // certificate for it); the old connection and its stream go down.
    gateway.stop().await;
    let ended = within("caller teardown", read_until_end(&mut caller)).await;
    assert!(ended.map_or(true, |rest| rest.is_empty()));
    let _gateway = within("rebind", async {
        loop {
            let device = pki.device("city-a", "gateway-1");
            match RunningGateway::try_start_with(&pki, device, addr, GatewayOptions::default()) {
                Ok(gateway) => break gateway,
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
    let (mut caller, _) = within("tunnel", tunnel(&client, addr, &request("b", service.addr)))
        .await
        .unwrap();
    round_trip(&mut caller, b"second").await;
    assert_eq!(client.connections(), 1);
}

/// A pooled connection whose gateway lost its state without a word (a crash
/// and restart on the same address: same identity, same stateless-reset
/// key, so the client learns of it from its first packet): a pipelined open
/// on it is retried on a new connection if none of the caller's bytes had
/// gone yet, and fails if they had, rather than send them twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_carry_retries_a_stale_connection_only_if_nothing_was_sent() {
    init_tracing();
    let pki = Pki::new();
    let start = || {
        let options = GatewayOptions {
            stateless_reset_key: Some([7; 32]),
            ..GatewayOptions::default()
        };
        let device = pki.device("city-a", "gateway-1");
        RunningGateway::start_with(&pki, device, "127.0.0.1:0".parse().unwrap(), options)
    };
    let mut first = start().await;
    let service = Service::start(Behaviour::Echo).await;
    let relay = Relay::start(first.addr).await;
    let (client, _) = first.client(&pki, "pc-1");
    let mut a = carried(&client, relay.addr, None, request("a", service.addr), b"").await;
    round_trip(&mut a.caller, b"first").await;
    a.caller.shutdown().await.unwrap();
    within("eof", read_until_end(&mut a.caller)).await.unwrap();
    within("carry", a.task).await.unwrap().unwrap();
    assert_eq!(first.decision().await.request.connection_id, "a");

    // A caller that waits for the service to speak first has sent nothing
    // when the stale connection turns out dead: retried, unseen.
    let mut second = start().await;
    relay.switch(second.addr).await;
    let mut b = carried(&client, relay.addr, None, request("b", service.addr), b"").await;
    let (told, _) = within("answer", b.told).await.unwrap();
    assert!(told.unwrap().0.allowed);
    round_trip(&mut b.caller, b"second").await;
    assert_eq!(second.decision().await.request.connection_id, "b");
    assert_eq!(client.connections(), 1);

    // A caller whose bytes went with the request: not sent again.
    let mut third = start().await;
    relay.switch(third.addr).await;
    let mut c = carried(
        &client,
        relay.addr,
        None,
        request("c", service.addr),
        b"not twice",
    )
    .await;
    let error = within("carry", c.task).await.unwrap().unwrap_err();
    assert!(
        matches!(error, TunnelError::Connection { .. }),
        "unexpected: {error}"
    );
    assert_reset(&mut c.caller).await;
    // The next one gets a new connection; the new gateway never saw "c".
    let mut d = carried(&client, relay.addr, None, request("d", service.addr), b"").await;
    round_trip(&mut d.caller, b"fourth").await;
    assert_eq!(third.decision().await.request.connection_id, "d");
    assert_eq!(service.accepted(), 3);
}

/// After a renewal the client authenticates with its new certificate: a
/// stream open on the old connection keeps working, new streams go over a
/// new connection the gateway sees with the new serial; the gateway's own
/// new certificate is what clients see from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewed_certificates_are_used_for_new_connections() {
    init_tracing();
    let pki = Pki::new();
    let mut gateway = RunningGateway::start(&pki).await;
    let service = Service::start(Behaviour::Echo).await;
    let (client, first) = gateway.client(&pki, "pc-renew");
    let (mut old_caller, _old_splice) = within(
        "first open",
        tunnel(&client, gateway.addr, &request("c1", service.addr)),
    )
    .await
    .unwrap();
    round_trip(&mut old_caller, b"before").await;
    assert_eq!(
        gateway.decision().await.peer.serial_hex,
        first.cert.serial_hex()
    );

    // The same device, a new certificate; the gateway renews too.
    let renewed = pki.device("city-a", "pc-renew");
    assert_ne!(renewed.cert.serial_hex(), first.cert.serial_hex());
    client
        .set_tls(pki.client_tls(&renewed, &gateway.device.id))
        .unwrap();
    let gateway_renewed = pki.device("city-a", "gateway-1");
    gateway
        .handle
        .set_tls(pki.gateway_tls(&gateway_renewed, gateway.revocations.clone()))
        .unwrap();

    let stream = within(
        "second open",
        client.open(gateway.addr, &request("c2", service.addr)),
    )
    .await
    .unwrap();
    assert_eq!(stream.peer().serial_hex, gateway_renewed.cert.serial_hex());
    let decision = gateway.decision().await;
    assert_eq!(decision.request.connection_id, "c2");
    assert_eq!(decision.peer.serial_hex, renewed.cert.serial_hex());
    drop(stream);
    // The stream opened before the renewal still carries bytes.
    round_trip(&mut old_caller, b"after").await;
    gateway.stop().await;
}
