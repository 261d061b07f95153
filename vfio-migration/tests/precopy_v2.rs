//! PRE_COPY info v2 through the live engine: a device that re-initialises its initial data
//! mid-migration withdraws the switchover acknowledgement until the new initial data is loaded
//! on the destination (locally and over the transport), and the destination's content verifies.

use std::io;

use vfio_migration::emulated::{EmulatedDevice, EmulatedHandle};
use vfio_migration::live::{
    Convergence, Destination, DestinationOptions, LiveError, LiveProgress, LocalMigration, SeqSink, SinkEvent, Source,
    SourceOptions,
};
use vfio_migration::transport::{self, ReceiveOptions, Receiver, SendOptions};
use vfio_migration::{DeviceState, MigrationDevice};

const SPEC: &str = "size=256K,block=4K,seed=5,flags=stop-copy+p2p+pre-copy+precopy-v2";
/// The initial data of `SPEC`: a 32-byte header and one 16-byte-headed record per block.
const INITIAL: u64 = 32 + 64 * (16 + 4096);

fn pair(spec: &str) -> (EmulatedDevice, EmulatedDevice) {
    (
        EmulatedDevice::from_spec(spec).unwrap(),
        EmulatedDevice::from_spec(spec).unwrap(),
    )
}

fn boxed<'a>(d: EmulatedDevice) -> Vec<Box<dyn MigrationDevice + 'a>> {
    vec![Box::new(d)]
}

/// What a pre-copy step sent, held back so the test decides when the destination sees it.
#[derive(Debug)]
enum Sent {
    Chunk(u64, Vec<u8>),
    Marker(u64),
}

fn step(src: &mut Source<'_>, counters: &mut [u64]) -> Vec<Sent> {
    let mut out = Vec::new();
    let mut sink = SeqSink::new(counters, |ev: SinkEvent<'_>| {
        out.push(match ev {
            SinkEvent::Chunk { seq, data, .. } => Sent::Chunk(seq, data.to_vec()),
            SinkEvent::InitialSent { chunks, .. } => Sent::Marker(chunks),
        });
        Ok(())
    });
    src.iterate(&mut sink, u64::MAX).unwrap();
    out
}

fn load_chunks(dst: &mut Destination<'_>, sent: &[Sent]) {
    for s in sent {
        if let Sent::Chunk(seq, data) = s {
            dst.load(0, *seq, data).unwrap();
        }
    }
}

fn marker(sent: &[Sent]) -> Option<u64> {
    sent.iter().find_map(|s| match s {
        Sent::Marker(n) => Some(*n),
        Sent::Chunk(..) => None,
    })
}

#[test]
fn a_reinit_after_the_ack_withdraws_it_until_the_new_initial_data_is_loaded() {
    let (src, dst) = pair(SPEC);
    let (sh, dh) = (src.handle(), dst.handle());
    let mut s = Source::new(boxed(src), SourceOptions::default()).unwrap();
    let mut d = Destination::new(boxed(dst), DestinationOptions::default()).unwrap();
    d.start().unwrap();
    s.start().unwrap();
    assert!(sh.precopy_v2_enabled(), "the engine opted the device in");
    let mut counters = vec![0u64; 1];

    // The initial data, its marker, loaded: acknowledged.
    let first = step(&mut s, &mut counters);
    let m1 = marker(&first).expect("initial-data marker");
    load_chunks(&mut d, &first);
    d.initial_sent(0, m1).unwrap();
    assert!(s.initial_drained() && d.switchover_ready());
    assert_eq!(s.initial_markers(), vec![1]);

    // New initial data: the source is no longer drained, so a converged policy does not switch.
    sh.trigger_reinit().unwrap();
    assert!(s.check_reinit().unwrap());
    assert!(!s.initial_drained());
    assert_eq!(s.reinits(), vec![1]);
    let policy = Convergence::default();
    let short = Some(std::time::Duration::ZERO);
    let zero = std::time::Duration::ZERO;
    assert_eq!(
        policy.decide(0, zero, short, s.initial_drained(), d.switchover_ready()),
        None
    );

    // The new initial data is read and the marker sent again, with the new chunk count.
    let second = step(&mut s, &mut counters);
    let m2 = marker(&second).expect("a second initial-data marker");
    assert!(m2 > m1);
    assert!(s.initial_drained());
    assert_eq!(s.initial_markers(), vec![2]);
    let bytes: u64 = second
        .iter()
        .map(|x| match x {
            Sent::Chunk(_, b) => b.len() as u64,
            Sent::Marker(_) => 0,
        })
        .sum();
    assert_eq!(bytes, INITIAL - 32, "every block again, no header");

    // The marker overtakes the chunks (several connections): no acknowledgement until they load.
    d.initial_sent(0, m2).unwrap();
    assert_eq!(d.initial_markers(), 2);
    assert!(!d.switchover_ready(), "the second marker withdraws the acknowledgement");
    load_chunks(&mut d, &second);
    assert!(
        d.switchover_ready(),
        "re-acknowledged once the new initial data is loaded"
    );
    // A marker counting fewer chunks than an earlier one is a sequence error.
    let e = d.initial_sent(0, m1).unwrap_err();
    assert!(matches!(e, LiveError::Sequence { device: 0, .. }), "{e}");

    // Stop-copy and load the rest: the destination's content verifies.
    {
        let mut sink = SeqSink::new(&mut counters, |ev: SinkEvent<'_>| match ev {
            SinkEvent::Chunk { seq, data, .. } => d.load(0, seq, data).map_err(io::Error::other),
            SinkEvent::InitialSent { .. } => Ok(()),
        });
        s.stop_copy(&mut sink).unwrap();
    }
    d.complete(Some(&counters)).unwrap();
    s.finish().unwrap();
    d.resume().unwrap();
    assert_eq!(sh.digest(), dh.digest());
    assert_eq!(dh.device_state(), DeviceState::Running);
}

/// A progress callback that re-initialises `src`'s initial data at the first pre-copy step.
fn reinit_once(src: EmulatedHandle) -> impl FnMut(&LiveProgress) {
    let mut fired = false;
    move |p| {
        if matches!(p, LiveProgress::Iteration { .. }) && !fired {
            fired = true;
            src.trigger_reinit().unwrap();
        }
    }
}

#[test]
fn local_migration_waits_for_the_new_initial_data_of_a_reinit() {
    let (src, dst) = pair(SPEC);
    let (sh, dh) = (src.handle(), dst.handle());
    let report = LocalMigration::default()
        .run(boxed(src), boxed(dst), &mut reinit_once(sh.clone()))
        .unwrap();
    assert_eq!(sh.reinits(), 1);
    assert_eq!(report.switch_reason, "converged");
    assert_eq!(
        report.initial_markers,
        vec![2],
        "the marker was sent again after the new initial data"
    );
    assert!(report.precopy_bytes[0] >= 2 * INITIAL - 32, "{report:?}");
    assert_eq!(sh.digest(), dh.digest());
    assert_eq!(dh.device_state(), DeviceState::Running);
}

#[test]
fn without_v2_a_reinit_is_not_seen_and_the_migration_is_as_before() {
    let (src, dst) = pair("size=256K,block=4K,seed=5");
    let (sh, dh) = (src.handle(), dst.handle());
    let report = LocalMigration::default()
        .run(boxed(src), boxed(dst), &mut reinit_once(sh.clone()))
        .unwrap();
    assert!(!sh.precopy_v2_enabled());
    assert_eq!(report.initial_markers, vec![1]);
    assert_eq!(sh.digest(), dh.digest());
}

#[test]
fn transport_reacknowledges_a_reinit_before_the_switchover() {
    let (src, dst) = pair(SPEC);
    let (sh, dh) = (src.handle(), dst.handle());
    let receiver = Receiver::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let url = receiver.url().clone();
    let destination = std::thread::spawn(move || receiver.receive(boxed(dst), &ReceiveOptions::default(), &mut |_| {}));
    let report = transport::send(&url, boxed(src), &SendOptions::default(), &mut reinit_once(sh.clone())).unwrap();
    let received = destination.join().unwrap().unwrap();
    assert_eq!(sh.reinits(), 1);
    assert_eq!(report.switch_reason, "converged");
    assert_eq!(report.initial_markers, vec![2]);
    // The switchover waited for an acknowledgement that covered the second marker.
    assert_eq!(received.acked_markers, 2, "{received:?}");
    assert!(received.switchover_acks >= 1);
    assert!(received.precopy_bytes[0] >= 2 * INITIAL - 32, "{received:?}");
    assert_eq!(sh.digest(), dh.digest());
    assert_eq!(dh.device_state(), DeviceState::Running);
}
