use std::time::Duration;

use super::*;

const KIB: usize = 1024;

#[test]
fn a_dropped_image_gives_its_buffer_back_for_the_next_answer() {
    let pool = BufferPool::new(64 * KIB);
    let mut buf = pool.try_take(1000).unwrap();
    buf.extend_from_slice(b"hello world");
    let first = buf.as_ptr();
    let bytes = buf.freeze();
    let image = bytes.slice(6..);
    drop(bytes);
    assert_eq!(pool.idle(), 0, "a slice still holds the buffer");
    assert_eq!(pool.held(), KIB, "and its reservation");
    assert_eq!(&image[..], b"world");
    drop(image);
    assert_eq!(pool.idle(), 1);
    assert_eq!(pool.held(), KIB, "an idle buffer keeps its reservation");
    let again = pool.try_take(500).unwrap();
    assert!(again.is_empty());
    assert_eq!(again.as_ptr(), first, "the same allocation is reused");
    assert_eq!(pool.idle(), 0);
}

#[test]
fn idle_buffers_make_room_for_answers_they_cannot_hold() {
    let pool = BufferPool::new(10 * KIB);
    let small: Vec<_> = (0..5).map(|_| pool.try_take(2 * KIB).unwrap()).collect();
    assert!(pool.try_take(KIB).is_none(), "the budget is full");
    drop(small);
    assert_eq!((pool.idle(), pool.held()), (5, 10 * KIB));
    // Too big for any idle buffer: idle ones are freed until it fits.
    let big = pool.try_take(6 * KIB).unwrap();
    assert!(big.capacity() >= 6 * KIB);
    assert_eq!(pool.idle(), 2, "three were freed, the smallest first");
    assert!(pool.held() <= pool.budget());
    drop(big);
    assert!(pool.held() <= pool.budget());
}

#[test]
fn a_buffer_that_outgrew_its_reservation_is_freed() {
    let pool = BufferPool::new(8 * KIB);
    let mut buf = pool.try_take(KIB).unwrap();
    buf.extend_from_slice(&[7; 5000]);
    assert!(buf.capacity() > buf.reserved());
    drop(buf);
    assert_eq!((pool.idle(), pool.held()), (0, 0));
}

#[tokio::test]
async fn an_answer_larger_than_the_budget_proceeds_alone() {
    let pool = BufferPool::new(4 * KIB);
    let mut huge = pool.take(100 * KIB).await;
    assert_eq!(huge.reserved(), 4 * KIB, "it holds the whole budget");
    huge.extend_from_slice(&[1; 100 * KIB]);
    assert!(
        pool.try_take(1).is_none(),
        "and nothing else proceeds meanwhile"
    );
    drop(huge);
    assert_eq!(pool.held(), 0, "too big to keep: freed");
    assert!(pool.try_take(KIB).is_some());
}

#[tokio::test]
async fn a_reservation_is_all_or_wait_and_waiters_are_served_in_order() {
    let pool = BufferPool::new(10 * KIB);
    let first = pool.take(6 * KIB).await;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // Needs 8: waits, with no buffer (only the first waiter gathers freed room, so no two
    // answers can each hold part of what the other needs).
    let big = tokio::spawn({
        let (pool, tx) = (pool.clone(), tx.clone());
        async move {
            let buf = pool.take(8 * KIB).await;
            tx.send("big").unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            drop(buf);
        }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(
        pool.try_take(KIB).is_none(),
        "the free room is the waiter's"
    );
    // Arrives later and would fit now: it waits behind the first waiter all the same.
    let small = tokio::spawn({
        let (pool, tx) = (pool.clone(), tx.clone());
        async move {
            let _buf = pool.take(2 * KIB).await;
            tx.send("small").unwrap();
        }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(rx.try_recv().is_err(), "both wait");
    assert_eq!(pool.waits(), 2);
    drop(first);
    assert_eq!(
        pool.idle(),
        0,
        "a buffer returned while someone waits is freed"
    );
    assert_eq!(rx.recv().await, Some("big"));
    assert_eq!(rx.recv().await, Some("small"));
    big.await.unwrap();
    small.await.unwrap();
    assert!(pool.held() <= pool.budget());
}

#[tokio::test]
async fn a_buffer_given_back_while_answers_wait_goes_to_the_next_one() {
    let pool = BufferPool::new(800 * KIB);
    let _others = pool.take(750 * KIB).await;
    let first = pool.take(50 * KIB).await;
    let memory = first.as_ptr();
    let next = tokio::spawn({
        let pool = pool.clone();
        async move { pool.take(50 * KIB - 100).await.as_ptr() as usize }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(first);
    assert_eq!(
        pool.inner.lock_handoff().len(),
        1,
        "its memory changes hands"
    );
    assert_eq!(
        next.await.unwrap(),
        memory as usize,
        "the waiter got the returned buffer's room and its memory"
    );
    assert!(pool.inner.lock_handoff().is_empty());
}

#[tokio::test]
async fn a_buffer_no_waiter_could_use_is_not_kept_once_no_one_waits() {
    let pool = BufferPool::new(800 * KIB);
    let others = pool.take(700 * KIB).await;
    let small = pool.take(50 * KIB).await;
    // Needs more than the small buffer's memory: waits, then gets a buffer of its own.
    let big = tokio::spawn({
        let pool = pool.clone();
        async move { pool.take(90 * KIB).await }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(small);
    let big = big.await.unwrap();
    assert!(big.capacity() >= 90 * KIB);
    assert!(
        pool.inner.lock_handoff().is_empty(),
        "the small buffer no one took is not held once no one waits"
    );
    assert_eq!(pool.idle(), 0, "no room in the budget for it: freed");
    assert_eq!(pool.held(), 790 * KIB);
    drop((others, big));
    assert!(pool.held() <= pool.budget());
}

#[tokio::test]
async fn answers_of_one_image_size_reuse_each_others_buffers() {
    let pool = BufferPool::new(32 << 20);
    let first = pool.take(2_000_100).await;
    assert_eq!(first.reserved() % (64 * KIB), 0);
    let _rest = pool.reserve(pool.budget() - first.reserved()).await;
    let memory = first.as_ptr() as usize;
    // A few hundred bytes shorter, across a KiB boundary: the same 64 KiB room, so the buffer
    // handed over fits it.
    let next = tokio::spawn({
        let pool = pool.clone();
        async move { pool.take(1_999_800).await.as_ptr() as usize }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    drop(first);
    assert_eq!(next.await.unwrap(), memory);
}

#[tokio::test]
async fn a_cancelled_wait_holds_nothing() {
    let pool = BufferPool::new(4 * KIB);
    let all = pool.take(4 * KIB).await;
    let waited = tokio::time::timeout(Duration::from_millis(20), pool.take(KIB)).await;
    assert!(waited.is_err());
    drop(all);
    assert_eq!(pool.idle(), 1, "no one waits any more: the buffer is kept");
    assert_eq!(pool.held(), 4 * KIB);
    let again = pool.take(4 * KIB).await;
    assert_eq!(again.reserved(), 4 * KIB);
}

#[tokio::test]
async fn request_bodies_share_the_budget() {
    let pool = BufferPool::new(8 * KIB);
    let body = pool.reserve(5 * KIB).await;
    assert_eq!(body.bytes(), 5 * KIB);
    assert!(pool.try_take(4 * KIB).is_none());
    let idle = pool.try_take(3 * KIB).unwrap();
    drop(idle);
    // The idle buffer is freed for a reservation that needs its room.
    let waiting = tokio::spawn({
        let pool = pool.clone();
        async move { pool.reserve(4 * KIB).await.bytes() }
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!waiting.is_finished());
    assert_eq!(pool.idle(), 0);
    drop(body);
    assert_eq!(waiting.await.unwrap(), 4 * KIB);
    assert_eq!(pool.held(), 0);
}

/// Many answers of random sizes, some larger than the budget, taken and dropped at random
/// moments on a multi-threaded runtime: every one completes (no deadlock), the budget is never
/// exceeded except by one answer alone, and nothing is held at the end but idle buffers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_answers_never_exceed_the_budget_nor_deadlock() {
    let budget = 64 * KIB;
    let pool = BufferPool::new(budget);
    let live = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    let mut rng = fastrand::Rng::with_seed(7);
    for _ in 0..400 {
        let size = match rng.u8(..10) {
            0 => rng.usize(budget..3 * budget),
            _ => rng.usize(1..budget / 4),
        };
        let hold = Duration::from_micros(rng.u64(0..2000));
        let (pool, live) = (pool.clone(), live.clone());
        tasks.push(tokio::spawn(async move {
            let mut buf = pool.take(size).await;
            buf.resize(size, 1);
            let memory = live.fetch_add(buf.capacity(), Ordering::SeqCst) + buf.capacity();
            assert!(
                memory <= budget || memory == buf.capacity(),
                "{memory} bytes held at once, over the budget"
            );
            tokio::time::sleep(hold).await;
            live.fetch_sub(buf.capacity(), Ordering::SeqCst);
            let image = buf.freeze().slice(..1);
            tokio::task::yield_now().await;
            drop(image);
        }));
    }
    let all = futures_join(tasks);
    tokio::time::timeout(Duration::from_secs(30), all)
        .await
        .expect("every answer completes");
    assert_eq!(pool.held(), pool.idle_bytes());
    assert!(pool.held() <= budget);
}

async fn futures_join(tasks: Vec<tokio::task::JoinHandle<()>>) {
    for t in tasks {
        t.await.unwrap();
    }
}
