//! The pipeline against what a hostile or broken job, provider or driver can do: unpriced models
//! under a cap, params a provider does not take, calls billed without an image, panics, and
//! jobs that reuse another job's id. Same set-up as the outcome tests beside it.

use super::*;

#[tokio::test(start_paused = true)]
async fn under_a_spend_cap_an_unpriced_model_is_refused_before_any_call() {
    // The stub's model has no price: counted as $0, it would escape the cap.
    let stub = Stub::new(10, Mode::Synchronous);
    let s = setup_with(&[("a", stub.clone())], &[("budget.max_worker_usd", "5")]);
    let (event, settle) = s
        .finish(serde_json::json!({"id": "u1", "prompt": "p"}))
        .await;
    assert_eq!(settle, Settle::DeadLetter);
    let error = event.data.error.expect("an error");
    assert_eq!(error.kind, ErrorKind::InvalidJob);
    assert!(
        error.message.contains("\"stub-model\""),
        "{}",
        error.message
    );
    assert_eq!(stub.submits(), 0);

    // With a fallback price, the job is bought and charged at that price, as an estimate.
    let stub = Stub::new(10, Mode::Synchronous);
    let s = setup_with(
        &[("a", stub.clone())],
        &[
            ("budget.max_worker_usd", "5"),
            ("pricing.fallback_usd_per_image", "0.25"),
        ],
    );
    let (event, _) = s
        .finish(serde_json::json!({"id": "u2", "prompt": "p", "n": 2}))
        .await;
    assert_eq!(event.data.status, Status::Succeeded);
    assert_eq!(event.data.cost_usd, Some(0.5));
    assert!(event.data.cost_estimated);
    assert_eq!(stub.submits(), 1);
}

#[tokio::test(start_paused = true)]
async fn params_a_provider_does_not_take_fail_the_job_before_any_call() {
    let (stub, s) = single(10, Mode::Synchronous);
    for (id, params) in [
        ("p1", serde_json::json!({"N": 10})),
        ("p2", serde_json::json!({"n ": 10})),
        ("p3", serde_json::json!({"steps": 4})),
    ] {
        let (event, settle) = s
            .finish(serde_json::json!({"id": id, "prompt": "p", "params": params}))
            .await;
        assert_eq!(settle, Settle::DeadLetter, "{id}");
        let error = event.data.error.expect("an error");
        assert_eq!(error.kind, ErrorKind::InvalidJob);
        assert!(
            error.message.contains("it takes: user"),
            "{}",
            error.message
        );
    }
    assert_eq!(stub.submits(), 0);
    // What it takes passes through.
    let (event, _) = s
        .finish(serde_json::json!({"id": "p4", "prompt": "p", "params": {"user": "u"}}))
        .await;
    assert_eq!(event.data.status, Status::Succeeded);
}

#[tokio::test(start_paused = true)]
async fn a_call_that_may_have_been_billed_is_charged_as_an_estimate() {
    // The first call times out after sending (maybe billed); the retry succeeds.
    let stub = Stub::new(10, Mode::Synchronous);
    stub.then(Scripted::Fail(Failure::Retryable {
        message: "operation timed out".into(),
        after: None,
        possibly_billed: true,
        detail: Box::default(),
    }));
    let s = setup_with(
        &[("a", stub.clone())],
        &[
            ("budget.max_worker_usd", "5"),
            ("pricing.fallback_usd_per_image", "0.25"),
        ],
    );
    let (event, _) = s
        .finish(serde_json::json!({"id": "b1", "prompt": "p", "n": 2}))
        .await;
    assert_eq!(event.data.status, Status::Succeeded);
    assert_eq!(stub.submits(), 2);
    assert_eq!(event.data.possibly_billed, 1);
    // Two images bought, and two that may have been billed without an answer.
    assert_eq!(event.data.cost_usd, Some(1.0));
    assert!(event.data.cost_estimated);
    let budget = s.pipeline.budget.as_ref().unwrap();
    assert_eq!(budget.worker_spent_usd(), 1.0, "the caps saw both calls");
}

#[tokio::test(start_paused = true)]
async fn a_panic_in_a_job_defers_it_as_a_failed_attempt_and_the_worker_goes_on() {
    let (stub, s) = single(10, Mode::Synchronous);
    stub.then(Scripted::Panic);
    let job = serde_json::json!({"id": "bug", "prompt": "p"});
    match s.process(job.clone()).await {
        Outcome::Defer { attempts, .. } => assert_eq!(attempts, 1),
        other => panic!("not deferred: {other:?}"),
    }
    // The same pipeline serves the job's next delivery.
    let (event, _) = s.finish(job).await;
    assert_eq!(event.data.status, Status::Succeeded);
    assert_eq!(stub.submits(), 2);
}

#[tokio::test(start_paused = true)]
async fn another_job_under_a_used_id_fails_as_a_conflict_instead_of_taking_its_result() {
    let (stub, s) = single(10, Mode::Synchronous);
    let (first, _) = s
        .finish(serde_json::json!({"id": "same", "prompt": "a red fox"}))
        .await;
    assert_eq!(first.data.status, Status::Succeeded);
    assert!(first.data.job_fingerprint.is_some());
    // Another prompt under the same id: not the fox.
    let (event, settle) = s
        .finish(serde_json::json!({"id": "same", "prompt": "a blue whale"}))
        .await;
    assert_eq!(settle, Settle::DeadLetter);
    assert_eq!(
        event.data.error.expect("an error").kind,
        ErrorKind::Conflict
    );
    assert!(event.data.images.is_empty());
    assert!(
        !s.exists("images/_/same/failed.json"),
        "nothing written there"
    );
    // The job itself, sent again (with other metadata), still gets its stored result.
    let (again, _) = s
        .finish(serde_json::json!({"id": "same", "prompt": "a red fox", "metadata": {"k": 1}}))
        .await;
    assert_eq!(again, first);
    assert_eq!(stub.submits(), 1);

    // A record stored before fingerprints existed matches any job, as it did.
    let record = s.dir.path().join("images/_/same/result.json");
    let mut old: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    old["data"]
        .as_object_mut()
        .unwrap()
        .remove("job_fingerprint");
    std::fs::write(&record, serde_json::to_vec(&old).unwrap()).unwrap();
    let (event, _) = s
        .finish(serde_json::json!({"id": "same", "prompt": "a blue whale"}))
        .await;
    assert_eq!(event.data.status, Status::Succeeded);
    assert_eq!(stub.submits(), 1);
}

#[tokio::test(start_paused = true)]
async fn on_the_fs_store_too_images_of_another_job_under_the_same_id_are_not_reused() {
    let (stub, s) = single(1, Mode::Synchronous);
    // A job of 2 images stored one, then its worker died before the second and the record.
    stub.then(Scripted::Images)
        .then(Scripted::Fail(stop(StopReason::QuotaExhausted)));
    let first = s
        .process(serde_json::json!({"id": "half", "prompt": "a red fox", "n": 2}))
        .await;
    assert!(matches!(first, Outcome::Return { .. }), "{first:?}");
    assert!(s.exists("images/_/half/0.png"));
    // Another job under the same id does not take that image.
    let (event, _) = s
        .finish(serde_json::json!({"id": "half", "prompt": "a blue whale", "n": 2}))
        .await;
    assert_eq!(
        event.data.error.expect("an error").kind,
        ErrorKind::Conflict
    );
}
