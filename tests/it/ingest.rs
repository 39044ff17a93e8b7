//! The topic router's grouping of readings under load (`fleetsql run --linger`): it holds
//! a small batch only while busy, for at most its limit, and never when turned off.

use std::time::Duration;

use fleetsql::ingest::Linger;
use tokio::sync::mpsc;

/// Routes a window's worth of readings at a rate far above `BUSY_RATE`, so that the
/// next call measures the router as busy.
async fn make_busy(linger: &mut Linger, rx: &mut mpsc::Receiver<u32>) {
    let mut buf: Vec<u32> = (0..100_000).collect();
    linger.fill(rx, &mut buf).await;
    tokio::time::sleep(Linger::WINDOW).await;
    let mut buf = vec![0];
    linger.fill(rx, &mut buf).await;
    assert!(linger.is_busy(), "100,000 readings in a window is busy");
}

#[tokio::test]
async fn a_quiet_router_routes_at_once() {
    let (_tx, mut rx) = mpsc::channel::<u32>(16);
    // Waiting would take an hour: the test's timeout says it did not.
    let mut linger = Linger::new(Duration::from_secs(3600));
    let mut buf = vec![1];
    tokio::time::timeout(Duration::from_secs(10), linger.fill(&mut rx, &mut buf))
        .await
        .expect("not busy: no wait");
    assert_eq!(buf, [1]);
    assert!(!linger.is_busy());
}

#[tokio::test]
async fn a_busy_router_waits_for_enough_readings_or_the_limit() {
    let (tx, mut rx) = mpsc::channel::<u32>(4096);
    let mut linger = Linger::new(Duration::from_secs(3600));
    make_busy(&mut linger, &mut rx).await;
    // More readings arrive while the router holds one: it goes on with ENOUGH of
    // them, long before its hour is up.
    let sender = tokio::spawn(async move {
        for i in 0..1000 {
            tx.send(i).await.unwrap();
            tokio::task::yield_now().await;
        }
    });
    let mut buf = vec![0];
    tokio::time::timeout(Duration::from_secs(10), linger.fill(&mut rx, &mut buf))
        .await
        .expect("enough readings end the wait");
    assert!(buf.len() >= Linger::ENOUGH, "{}", buf.len());
    sender.await.unwrap();

    // Nothing more arrives: it goes on alone once the wait is over.
    let mut linger = Linger::new(Duration::from_millis(30));
    let (_tx, mut rx) = mpsc::channel::<u32>(16);
    make_busy(&mut linger, &mut rx).await;
    let started = tokio::time::Instant::now();
    let mut buf = vec![7];
    linger.fill(&mut rx, &mut buf).await;
    assert!(started.elapsed() >= Duration::from_millis(30));
    assert_eq!(buf, [7]);
}

#[tokio::test]
async fn zero_linger_never_waits_and_a_stale_busy_window_expires() {
    let (_tx, mut rx) = mpsc::channel::<u32>(16);
    let mut off = Linger::new(Duration::ZERO);
    make_busy(&mut off, &mut rx).await;
    let mut buf = vec![1];
    tokio::time::timeout(Duration::from_secs(10), off.fill(&mut rx, &mut buf))
        .await
        .expect("--linger 0: no wait");

    // Busy once, then quiet for two windows: the next reading is not held.
    let mut linger = Linger::new(Duration::from_secs(3600));
    make_busy(&mut linger, &mut rx).await;
    tokio::time::sleep(2 * Linger::WINDOW).await;
    let mut buf = vec![1];
    tokio::time::timeout(Duration::from_secs(10), linger.fill(&mut rx, &mut buf))
        .await
        .expect("a quiet fleet's next reading goes on at once");
}
