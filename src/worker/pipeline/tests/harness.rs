//! The tests' set-up: stub providers that answer as scripted, and a pipeline on the fs store
//! in a temporary directory.

use super::*;

/// What a stub answers to its next request.
pub(super) enum Scripted {
    /// The images asked for.
    Images,
    /// Fewer images than asked for.
    Short(u8),
    /// Queued: look again after this long.
    Pending(Duration),
    /// No room at the provider now: nothing sent.
    Busy(Duration),
    Fail(Failure),
    /// A bug in the driver.
    Panic,
}

pub(super) struct Stub {
    capabilities: Capabilities,
    defaults: JobDefaults,
    script: Mutex<VecDeque<Scripted>>,
    submits: AtomicU32,
    polls: AtomicU32,
}

impl Stub {
    pub(super) fn new(images_per_call: u8, mode: Mode) -> Arc<Self> {
        Arc::new(Self {
            capabilities: Capabilities {
                images_per_call,
                sizes: Sizes::Any,
                formats: None,
                seed: false,
                negative_prompt: false,
                transparency: true,
                mode,
                references: 0,
                mask: false,
                params: &["user"],
            },
            defaults: JobDefaults {
                model: "stub-model".into(),
                size: "64x64".into(),
                quality: None,
                output_format: Some("png".into()),
                background: None,
            },
            script: Mutex::default(),
            submits: AtomicU32::new(0),
            polls: AtomicU32::new(0),
        })
    }

    pub(super) fn then(&self, answer: Scripted) -> &Self {
        self.script.lock().unwrap().push_back(answer);
        self
    }

    pub(super) fn submits(&self) -> u32 {
        self.submits.load(Ordering::SeqCst)
    }

    pub(super) fn polls(&self) -> u32 {
        self.polls.load(Ordering::SeqCst)
    }

    pub(super) fn answer(&self, request: &ImageRequest) -> Result<Answer, Failure> {
        let next = self.script.lock().unwrap().pop_front();
        let count = match next.unwrap_or(Scripted::Images) {
            Scripted::Images => request.count,
            Scripted::Short(n) => n,
            Scripted::Pending(after) => {
                return Ok(Answer::Pending {
                    handle: Handle(serde_json::json!({"id": "req-1"})),
                    after,
                    request_id: Some("req-1".into()),
                });
            }
            Scripted::Busy(after) => return Ok(Answer::Busy { after }),
            Scripted::Fail(failure) => return Err(failure),
            Scripted::Panic => panic!("the driver hit a bug"),
        };
        let images = (0..count)
            .map(|i| GeneratedImage {
                data: Bytes::from(
                    [
                        &b"\x89PNG\r\n\x1a\n"[..],
                        format!("{} {i}", request.prompt).as_bytes(),
                    ]
                    .concat(),
                ),
                content_type: "image/png",
                extension: "png",
                revised_prompt: None,
            })
            .collect::<Vec<_>>();
        Ok(Answer::Done(Generation {
            usage: crate::domain::cost::Usage {
                images: images.len() as u32,
                ..Default::default()
            },
            images,
            reported_usage: None,
            model: Some(request.model.clone()),
            request_id: Some("req-1".into()),
            rate_limits: None,
        }))
    }
}

impl ImageProvider for Stub {
    fn kind(&self) -> &'static str {
        "stub"
    }

    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    fn defaults(&self) -> &JobDefaults {
        &self.defaults
    }

    fn submit<'a>(
        &'a self,
        request: &'a ImageRequest,
        _journal: &'a dyn Journal,
    ) -> BoxFuture<'a, Result<Answer, Failure>> {
        self.submits.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move { self.answer(request) })
    }

    fn poll<'a>(
        &'a self,
        handle: &'a Handle,
        request: &'a ImageRequest,
        _journal: &'a dyn Journal,
    ) -> BoxFuture<'a, Result<Answer, Failure>> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        assert_eq!(handle.0["id"], "req-1", "the handle from the journal");
        Box::pin(async move { self.answer(request) })
    }
}

pub(super) struct Setup {
    pub(super) pipeline: Pipeline,
    pub(super) dir: tempfile::TempDir,
}

pub(super) fn settings(root: &std::path::Path, extra: &[(&str, &str)]) -> Settings {
    let mut overrides = vec![
        ("storage.kind", "fs".to_string()),
        ("storage.root", root.display().to_string()),
        ("retry.initial_delay_ms", "10".into()),
        ("retry.max_delay_ms", "50".into()),
    ];
    overrides.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    Settings::load_with_overrides(&Sources::default(), &overrides).unwrap()
}

/// A pipeline over `providers` (the first is the default), on a fresh fs store.
pub(super) fn setup(providers: &[(&str, Arc<Stub>)]) -> Setup {
    setup_with(providers, &[])
}

/// The same with settings changed by `extra`; with a spend cap among them, the pipeline has
/// a budget.
pub(super) fn setup_with(providers: &[(&str, Arc<Stub>)], extra: &[(&str, &str)]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let settings = settings(dir.path(), extra);
    let base = settings.default_provider();
    let routes = providers
        .iter()
        .map(|(name, stub)| {
            let provider: Arc<dyn ImageProvider> = stub.clone();
            Route::new(name, provider, base, Duration::from_secs(60))
        })
        .collect();
    let store: Arc<dyn ObjectStore> = Arc::new(FsStore::new(dir.path()).unwrap());
    let mut pipeline = Pipeline::new(
        &settings,
        Routes::new(routes, providers[0].0),
        store.clone(),
    );
    if let Some(budget) = Budget::from_settings(&settings, store) {
        pipeline = pipeline.with_budget(budget);
    }
    Setup { pipeline, dir }
}

/// A pipeline over one stub provider named `a`.
pub(super) fn single(images_per_call: u8, mode: Mode) -> (Arc<Stub>, Setup) {
    let stub = Stub::new(images_per_call, mode);
    let setup = setup(&[("a", stub.clone())]);
    (stub, setup)
}

impl Setup {
    pub(super) async fn process(&self, body: serde_json::Value) -> Outcome {
        self.process_with(body, &CancellationToken::new()).await
    }

    pub(super) async fn process_with(
        &self,
        body: serde_json::Value,
        halt: &CancellationToken,
    ) -> Outcome {
        let body = serde_json::to_vec(&body).unwrap();
        self.pipeline
            .process(
                Delivery {
                    body: &body,
                    message_id: None,
                    correlation_id: None,
                    attempts: 0,
                    probe: false,
                    live_only: false,
                },
                halt,
            )
            .await
    }

    /// Processes a job that must finish (succeed or fail).
    pub(super) async fn finish(&self, body: serde_json::Value) -> (CloudEvent, Settle) {
        finished(self.process(body).await)
    }

    pub(super) fn exists(&self, key: &str) -> bool {
        self.dir.path().join(key).exists()
    }

    /// The image indices of the request the job's journal names, when it names one.
    pub(super) fn pending_indices(&self, job_dir: &str) -> Option<Vec<u32>> {
        let path = self.dir.path().join(job_dir).join("journal/pending.json");
        let entry: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        serde_json::from_value(entry["indices"].clone()).ok()
    }
}

pub(super) fn finished(outcome: Outcome) -> (CloudEvent, Settle) {
    match outcome {
        Outcome::Finished { event, settle } => (*event, settle),
        other => panic!("not finished: {other:?}"),
    }
}

pub(super) fn stop(reason: StopReason) -> Failure {
    Failure::Stop {
        reason,
        message: "You exceeded your current quota".into(),
        detail: Box::default(),
    }
}
