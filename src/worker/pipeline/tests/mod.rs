//! The pipeline without a broker: the fs store in a temporary directory, stub providers that
//! answer as scripted, and paused time. One test per outcome here; the set-up is in [`harness`],
//! and what hostile jobs and providers meet in [`hostile`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::config::{Settings, Sources};
use crate::domain::error::ProviderDetail;
use crate::provider::{
    Answer, Capabilities, GeneratedImage, Generation, Handle, ImageProvider, JobDefaults, Journal,
    Mode, Sizes,
};
use crate::storage::fs::FsStore;
use crate::worker::providers::Route;

mod harness;
use harness::*;

#[tokio::test(start_paused = true)]
async fn a_job_succeeds_and_its_images_and_record_are_stored() {
    let (stub, s) = single(10, Mode::Synchronous);
    let (event, settle) = s
        .finish(serde_json::json!({"id": "j1", "prompt": "p", "n": 2}))
        .await;
    assert_eq!(settle, Settle::Ack);
    assert_eq!(event.data.status, Status::Succeeded);
    assert_eq!(event.data.images.len(), 2);
    assert_eq!(event.data.model.as_deref(), Some("stub-model"));
    assert_eq!(stub.submits(), 1);
    assert!(s.exists("images/_/j1/0.png") && s.exists("images/_/j1/1.png"));
    assert!(s.exists("images/_/j1/result.json"));
}

#[tokio::test(start_paused = true)]
async fn a_provider_of_one_image_per_call_gets_as_many_calls_as_the_job_needs() {
    let (stub, s) = single(1, Mode::Synchronous);
    let (event, _) = s
        .finish(serde_json::json!({"id": "j3", "prompt": "p", "n": 3}))
        .await;
    assert_eq!(event.data.status, Status::Succeeded);
    let indices: Vec<u32> = event.data.images.iter().map(|i| i.index).collect();
    assert_eq!(indices, [0, 1, 2]);
    assert_eq!(
        stub.submits(),
        3,
        "one call per image, none counted as failed"
    );
    assert_eq!(event.data.attempts, 3);
    // A short answer of a provider that gives several is a failure, retried for the rest.
    let (stub, s) = single(4, Mode::Synchronous);
    stub.then(Scripted::Short(1));
    let (event, _) = s
        .finish(serde_json::json!({"id": "j4", "prompt": "p", "n": 4}))
        .await;
    assert_eq!(event.data.images.len(), 4);
    assert_eq!(stub.submits(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_refused_prompt_fails_once_and_is_dead_lettered_with_its_record() {
    let (stub, s) = single(10, Mode::Synchronous);
    stub.then(Scripted::Fail(Failure::Permanent {
        kind: ErrorKind::ContentPolicy,
        message: "rejected by the safety system".into(),
        detail: Box::new(ProviderDetail {
            status: Some(400),
            code: Some("moderation_blocked".into()),
            ..ProviderDetail::default()
        }),
    }));
    let (event, settle) = s
        .finish(serde_json::json!({"id": "bad", "prompt": "p"}))
        .await;
    assert_eq!(settle, Settle::DeadLetter);
    assert_eq!(event.data.status, Status::Failed);
    let error = event.data.error.unwrap();
    assert_eq!(error.kind, ErrorKind::ContentPolicy);
    assert_eq!(error.provider_code.as_deref(), Some("moderation_blocked"));
    assert_eq!(stub.submits(), 1, "never retried");
    assert!(s.exists("images/_/bad/failed.json"));
}

#[tokio::test(start_paused = true)]
async fn a_request_beyond_the_providers_capabilities_fails_before_any_call() {
    let (stub, s) = single(10, Mode::Synchronous);
    for (job, says) in [
        (
            serde_json::json!({"id": "s", "prompt": "p", "seed": 4}),
            "takes no seed",
        ),
        (
            serde_json::json!({"id": "np", "prompt": "p", "negative_prompt": "text"}),
            "takes no negative_prompt",
        ),
    ] {
        let (event, settle) = s.finish(job).await;
        assert_eq!(settle, Settle::DeadLetter);
        let error = event.data.error.unwrap();
        assert_eq!(error.kind, ErrorKind::InvalidJob);
        assert!(
            error
                .message
                .contains(&format!("provider a (kind stub) {says}")),
            "{}",
            error.message
        );
    }
    assert_eq!(stub.submits(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_long_server_delay_defers_the_job_with_its_attempt_counted() {
    let (stub, s) = single(10, Mode::Synchronous);
    stub.then(Scripted::Fail(Failure::Retryable {
        message: "Rate limit reached".into(),
        after: Some(Duration::from_secs(90)),
        possibly_billed: false,
        detail: Box::default(),
    }));
    match s
        .process(serde_json::json!({"id": "slow", "prompt": "p"}))
        .await
    {
        Outcome::Defer { after, attempts } => {
            assert_eq!(after, Duration::from_secs(90));
            assert_eq!(attempts, 1);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(stub.submits(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_queued_job_is_polled_with_its_journal_handle_never_submitted_again() {
    // No hold: every "not yet" hands the job back to the consumer (a delay queue).
    let stub = Stub::new(1, Mode::SubmitAndPoll);
    let s = setup_with(&[("a", stub.clone())], &[("worker.pending_hold_secs", "0")]);
    stub.then(Scripted::Pending(Duration::from_secs(5)))
        .then(Scripted::Pending(Duration::from_secs(5)));
    let job = serde_json::json!({"id": "q", "prompt": "p"});
    for round in 0..2 {
        match s.process(job.clone()).await {
            Outcome::Pending { after, attempts } => {
                assert_eq!(after, Duration::from_secs(5));
                assert_eq!(attempts, 0, "not ready is not a failed attempt");
            }
            other => panic!("round {round}: {other:?}"),
        }
        assert!(s.exists("images/_/q/journal/pending.json"));
        let route = s.pipeline.routes().get(None).unwrap();
        assert_eq!(
            route.throttle.state().in_flight,
            0,
            "a pending job holds no slot"
        );
    }
    assert_eq!((stub.submits(), stub.polls()), (1, 1));
    let (event, _) = s.finish(job).await;
    assert_eq!(event.data.status, Status::Succeeded);
    assert_eq!((stub.submits(), stub.polls()), (1, 2));
    assert_eq!(event.data.attempts, 1, "one submit, polls are not calls");
    assert_eq!(
        s.pending_indices("images/_/q"),
        Some(vec![0]),
        "kept, spent"
    );
}

#[tokio::test(start_paused = true)]
async fn within_the_hold_a_queued_job_is_polled_in_process_in_one_delivery() {
    let (stub, s) = single(1, Mode::SubmitAndPoll);
    stub.then(Scripted::Pending(Duration::from_secs(5)))
        .then(Scripted::Pending(Duration::from_secs(5)))
        .then(Scripted::Pending(Duration::from_secs(5)));
    let job = serde_json::json!({"id": "h", "prompt": "p"});
    // 60 s of hold by default: three "not yet" of 5 s each, then the images, in one delivery.
    let started = tokio::time::Instant::now();
    let (event, _) = s.finish(job).await;
    assert_eq!(event.data.status, Status::Succeeded);
    assert_eq!((stub.submits(), stub.polls()), (1, 3));
    assert_eq!(started.elapsed(), Duration::from_secs(15));
    assert_eq!(event.data.attempts, 1);
    assert_eq!(s.pending_indices("images/_/h"), Some(vec![0]));
}

#[tokio::test(start_paused = true)]
async fn a_request_queued_before_its_provider_paused_is_still_collected() {
    let stub = Stub::new(1, Mode::SubmitAndPoll);
    let s = setup_with(&[("a", stub.clone())], &[("worker.pending_hold_secs", "0")]);
    stub.then(Scripted::Pending(Duration::from_secs(5)));
    let job = serde_json::json!({"id": "pp", "prompt": "p"});
    assert!(matches!(
        s.process(job.clone()).await,
        Outcome::Pending { .. }
    ));
    // Out of credits now: no new submit goes out, but the queued task is paid for already.
    let route = s.pipeline.routes().get(None).unwrap();
    route.pause(StopReason::QuotaExhausted, "credits used up");
    let (event, _) = s.finish(job).await;
    assert_eq!(
        event.data.status,
        Status::Succeeded,
        "{:?}",
        event.data.error
    );
    assert_eq!((stub.submits(), stub.polls()), (1, 1));
    assert!(route.paused().is_some(), "a poll is not a probe");
}

#[tokio::test(start_paused = true)]
async fn a_provider_without_room_sends_the_job_to_a_delay_queue_without_an_attempt() {
    let (stub, s) = single(1, Mode::SubmitAndPoll);
    stub.then(Scripted::Busy(Duration::from_secs(5)));
    let job = serde_json::json!({"id": "busy", "prompt": "p"});
    match s.process(job.clone()).await {
        Outcome::Pending { after, attempts } => {
            assert_eq!(after, Duration::from_secs(5));
            assert_eq!(attempts, 0, "nothing was sent");
        }
        other => panic!("{other:?}"),
    }
    assert!(!s.exists("images/_/busy/journal/pending.json"));
    let (event, _) = s.finish(job).await;
    assert_eq!(event.data.status, Status::Succeeded);
    assert_eq!(event.data.attempts, 1, "only the call that was made counts");
}

#[tokio::test(start_paused = true)]
async fn a_poll_that_fails_is_polled_again_never_counted_as_possibly_billed() {
    // A download of the finished request that broke off, twice: the request is paid for and
    // polling it again costs nothing, so neither failure spends the job's possibly billed retry.
    let (stub, s) = single(1, Mode::SubmitAndPoll);
    let broken = || {
        Scripted::Fail(Failure::Retryable {
            message: "downloading the generated image failed".into(),
            after: None,
            possibly_billed: true,
            detail: Box::default(),
        })
    };
    stub.then(Scripted::Pending(Duration::from_secs(1)))
        .then(broken())
        .then(broken())
        .then(Scripted::Images);
    let (event, _) = s
        .finish(serde_json::json!({"id": "pf", "prompt": "p"}))
        .await;
    assert_eq!(
        event.data.status,
        Status::Succeeded,
        "{:?}",
        event.data.error
    );
    assert_eq!((stub.submits(), stub.polls()), (1, 3));
    assert_eq!(event.data.possibly_billed, 0);
}

#[tokio::test(start_paused = true)]
async fn a_short_answer_to_a_poll_is_not_polled_again_for_the_missing_image() {
    let stub = Stub::new(2, Mode::SubmitAndPoll);
    let s = setup_with(&[("a", stub.clone())], &[("worker.pending_hold_secs", "0")]);
    stub.then(Scripted::Pending(Duration::from_secs(1)))
        .then(Scripted::Short(1))
        .then(Scripted::Fail(Failure::Retryable {
            message: "Rate limit reached".into(),
            after: Some(Duration::from_secs(90)),
            possibly_billed: false,
            detail: Box::default(),
        }));
    let job = serde_json::json!({"id": "sh", "prompt": "p", "n": 2});
    assert!(matches!(
        s.process(job.clone()).await,
        Outcome::Pending { .. }
    ));
    // The poll answers one image of two; asking for the other is deferred.
    assert!(matches!(
        s.process(job.clone()).await,
        Outcome::Defer { .. }
    ));
    assert_eq!((stub.submits(), stub.polls()), (2, 1));
    // The next delivery asks anew for the missing image: polling the short-answered request
    // again would store its image a second time in the other's place.
    let (event, _) = s.finish(job).await;
    assert_eq!(
        event.data.status,
        Status::Succeeded,
        "{:?}",
        event.data.error
    );
    assert_eq!(event.data.images.len(), 2);
    assert_eq!((stub.submits(), stub.polls()), (3, 1));
}

#[tokio::test(start_paused = true)]
async fn a_spent_journal_entry_is_never_polled_again_for_the_next_image() {
    // Two images, one per call. The first is queued, polled and stored; the second's submit
    // fails for long enough to defer the job, so the journal still names the first request.
    let stub = Stub::new(1, Mode::SubmitAndPoll);
    let s = setup_with(&[("a", stub.clone())], &[("worker.pending_hold_secs", "0")]);
    stub.then(Scripted::Pending(Duration::from_secs(5)))
        .then(Scripted::Images)
        .then(Scripted::Fail(Failure::Retryable {
            message: "Rate limit reached".into(),
            after: Some(Duration::from_secs(90)),
            possibly_billed: false,
            detail: Box::default(),
        }));
    let job = serde_json::json!({"id": "two", "prompt": "p", "n": 2});
    assert!(matches!(
        s.process(job.clone()).await,
        Outcome::Pending { .. }
    ));
    assert!(matches!(
        s.process(job.clone()).await,
        Outcome::Defer { .. }
    ));
    assert_eq!((stub.submits(), stub.polls()), (2, 1));
    assert_eq!(s.pending_indices("images/_/two"), Some(vec![0]));
    // The next delivery submits for the second image instead of polling the spent request
    // (which would store the first image's bytes again as the second).
    let (event, _) = s.finish(job).await;
    assert_eq!(event.data.status, Status::Succeeded);
    assert_eq!((stub.submits(), stub.polls()), (3, 1));
    assert_eq!(event.data.images.len(), 2);
}

#[tokio::test(start_paused = true)]
async fn quota_pauses_the_only_provider_and_returns_its_jobs_untouched() {
    let (stub, s) = single(10, Mode::Synchronous);
    stub.then(Scripted::Fail(stop(StopReason::QuotaExhausted)));
    for id in ["first", "second"] {
        match s
            .process(serde_json::json!({"id": id, "prompt": "p"}))
            .await
        {
            Outcome::Return {
                reason: ReturnReason::Stop { reason, .. },
            } => assert_eq!(reason, StopReason::QuotaExhausted),
            other => panic!("{id}: {other:?}"),
        }
    }
    assert_eq!(stub.submits(), 1, "a paused provider is not called");
    // After the probe interval, one job is its probe: it gets through and the provider resumes.
    tokio::time::advance(Duration::from_secs(61)).await;
    let (event, _) = s
        .finish(serde_json::json!({"id": "third", "prompt": "p"}))
        .await;
    assert_eq!(event.data.status, Status::Succeeded);
    assert!(s.pipeline.routes().all_paused().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_worker_that_stops_taking_jobs_returns_the_waiting_ones_untouched() {
    let (stub, s) = single(10, Mode::Synchronous);
    let halt = CancellationToken::new();
    halt.cancel();
    match s
        .process_with(serde_json::json!({"id": "late", "prompt": "p"}), &halt)
        .await
    {
        Outcome::Return {
            reason: ReturnReason::Halted,
        } => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(stub.submits(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_stored_result_is_published_again_without_a_call() {
    let (stub, s) = single(10, Mode::Synchronous);
    let job = serde_json::json!({"id": "again", "prompt": "p", "n": 2});
    let (first, _) = s.finish(job.clone()).await;
    let (second, settle) = s.finish(job).await;
    assert_eq!(settle, Settle::Ack);
    assert_eq!(second, first, "the very same event, from the record");
    assert_eq!(stub.submits(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_live_lease_of_another_worker_defers_the_job() {
    let (stub, s) = single(10, Mode::Synchronous);
    let pipeline = Setup {
        pipeline: s
            .pipeline
            .with_leases("me".into(), Duration::from_secs(30), 3),
        dir: s.dir,
    };
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
        + 20_000;
    let lease = serde_json::json!({"owner": "another-worker", "expires_unix_ms": expires});
    std::fs::create_dir_all(pipeline.dir.path().join("images/_/held")).unwrap();
    std::fs::write(
        pipeline.dir.path().join("images/_/held/lease.json"),
        lease.to_string(),
    )
    .unwrap();
    match pipeline
        .process(serde_json::json!({"id": "held", "prompt": "p"}))
        .await
    {
        Outcome::Defer { after, attempts } => {
            assert!(
                after > Duration::from_secs(15) && after <= Duration::from_secs(20),
                "{after:?}"
            );
            assert_eq!(attempts, 0);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(stub.submits(), 0);
}

#[tokio::test(start_paused = true)]
async fn one_paused_provider_defers_its_jobs_while_another_serves() {
    let out_of_quota = Stub::new(10, Mode::Synchronous);
    out_of_quota.then(Scripted::Fail(stop(StopReason::QuotaExhausted)));
    let healthy = Stub::new(10, Mode::Synchronous);
    let s = setup(&[("a", out_of_quota.clone()), ("b", healthy.clone())]);
    for id in ["a1", "a2"] {
        match s
            .process(serde_json::json!({"id": id, "prompt": "p"}))
            .await
        {
            Outcome::Defer { after, attempts } => {
                assert!(
                    after >= Duration::from_secs(59),
                    "until the probe: {after:?}"
                );
                assert_eq!(attempts, 0, "a paused provider costs its jobs no attempt");
            }
            other => panic!("{id}: {other:?}"),
        }
    }
    assert_eq!(out_of_quota.submits(), 1);
    let (event, _) = s
        .finish(serde_json::json!({"id": "b1", "prompt": "p", "provider": "b"}))
        .await;
    assert_eq!(event.data.status, Status::Succeeded);
    assert_eq!(healthy.submits(), 1);
    let a = s.pipeline.routes().get(Some("a")).unwrap();
    assert_eq!(a.paused().map(|(r, _)| r), Some(StopReason::QuotaExhausted));
}

mod hostile;
