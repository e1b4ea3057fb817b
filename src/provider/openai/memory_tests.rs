//! The answer memory, end to end against the fake API: answers wait for room without their wait
//! counting in the request timeout, and never more than the budget is held at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use imagegen_fakes::openai::{FakeApi, FakeOptions};

use super::hosts_tests::{self, NoJournal, settings};
use super::*;

fn request(prompt: &str) -> ImageRequest {
    ImageRequest {
        prompt: prompt.into(),
        ..hosts_tests::request()
    }
}

/// Eight calls answered at about the same moment, each answer about 800 KB of base64, with a
/// 1 MiB budget: one answer at a time is read, and each is held 400 ms (a slow upload) before
/// the next one may be read. The last one waits about 3 s for room, three times the 1 s request
/// timeout: every call still succeeds, and each was bought exactly once.
#[tokio::test]
async fn answers_wait_for_room_outside_the_request_timeout_and_the_budget_holds() {
    crate::install_crypto_provider();
    let fake = FakeApi::new(FakeOptions {
        latency: Duration::from_millis(200),
        image_bytes: 600_000,
        ..FakeOptions::default()
    })
    .start()
    .await
    .unwrap();
    let memory = BufferPool::new(1 << 20);
    let provider = Arc::new(
        OpenAi::new(
            &settings(
                &fake.base_url(),
                &[("request_timeout_secs", "1"), ("auth", "bearer")],
            ),
            memory.clone(),
        )
        .unwrap(),
    );
    let live = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let calls: Vec<_> = (0..8)
        .map(|i| {
            let (provider, live, most, memory) =
                (provider.clone(), live.clone(), most.clone(), memory.clone());
            tokio::spawn(async move {
                let answer = provider
                    .submit(&request(&format!("held answer {i}")), &NoJournal)
                    .await;
                let Ok(Answer::Done(generation)) = answer else {
                    panic!("call {i} failed: {:?}", answer.err());
                };
                let now = live.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                assert!(memory.held() <= memory.budget(), "{} held", memory.held());
                assert!(generation.images[0].data.len() > 500_000);
                tokio::time::sleep(Duration::from_millis(400)).await;
                live.fetch_sub(1, Ordering::SeqCst);
                drop(generation);
            })
        })
        .collect();
    for call in calls {
        call.await.unwrap();
    }
    assert_eq!(
        most.load(Ordering::SeqCst),
        1,
        "two answers of 800 KB were held at once within 1 MiB"
    );
    let stats = fake.api.stats();
    assert_eq!((stats.requests, stats.billed), (8, 8), "{stats:?}");
}

/// An answer larger than the whole budget is still read (alone), not refused or stuck.
#[tokio::test]
async fn an_answer_larger_than_the_budget_proceeds_alone() {
    crate::install_crypto_provider();
    let fake = FakeApi::new(FakeOptions {
        image_bytes: 2_000_000,
        ..FakeOptions::default()
    })
    .start()
    .await
    .unwrap();
    let memory = BufferPool::new(1 << 20);
    let provider = OpenAi::new(
        &settings(&fake.base_url(), &[("auth", "bearer")]),
        memory.clone(),
    )
    .unwrap();
    let Answer::Done(generation) = provider
        .submit(&request("a big one"), &NoJournal)
        .await
        .unwrap()
    else {
        panic!("a synchronous provider answers at once")
    };
    assert!(generation.images[0].data.len() > 1 << 20);
    assert!(memory.try_take(1).is_none(), "it holds the whole budget");
    drop(generation);
    assert!(memory.try_take(1).is_some());
}
