//! The providers a worker calls, each a [`Route`]: the driver, and what the worker keeps of it
//! (its throttle, retries, prices, and whether it is paused).
//!
//! A provider that refuses every request (out of quota, credentials refused) is paused on its
//! own: jobs for it wait in the delay queues without an attempt counted, while jobs for other
//! providers go on. Every `worker.pause_probe_secs`, one real job is let through as a probe; the
//! provider resumes when a probe gets an answer that is not another refusal of everything. Only
//! when every provider is paused does the worker stop taking jobs (the single-provider case).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{error, info};

use super::retry::RetryPolicy;
use super::throttle::Throttle;
use crate::config::{ProviderSettings, Settings};
use crate::domain::cost::{Cost, PriceTable, Purchase};
use crate::domain::error::StopReason;
use crate::provider::ImageProvider;
use crate::provider::ImageRequest;
use crate::provider::buffers::BufferPool;

/// One provider and the worker's state of it.
pub struct Route {
    /// The configured name (`provider` in a job).
    pub name: String,
    pub provider: Arc<dyn ImageProvider>,
    pub throttle: Throttle,
    pub retry: RetryPolicy,
    pub prices: PriceTable,
    /// `params` fields jobs may set beyond those its kind takes (`params_allowed`).
    params_allowed: Vec<String>,
    /// The providers a job moves to when this one is out of service for it, in order.
    pub fallback: Vec<String>,
    /// Whether a content refusal moves the job to them too.
    pub fallback_on_refusal: bool,
    probe_every: Duration,
    pause: Mutex<Option<Paused>>,
    /// True while paused; jobs waiting for a call slot watch it.
    paused_tx: watch::Sender<bool>,
}

#[derive(Debug, Clone)]
struct Paused {
    reason: StopReason,
    message: String,
    next_probe: Instant,
    probing: bool,
}

/// Whether a job may call the provider now.
pub enum Admission<'a> {
    /// The provider takes requests.
    Open,
    /// The provider is paused, and this job is its probe.
    Probe(ProbeGuard<'a>),
    /// The provider is paused: come back after this long.
    Paused(Duration),
}

impl Route {
    pub fn new(
        name: &str,
        provider: Arc<dyn ImageProvider>,
        settings: &ProviderSettings,
        probe_every: Duration,
    ) -> Self {
        Self {
            name: name.to_string(),
            provider,
            throttle: Throttle::from_settings(settings),
            retry: RetryPolicy::from_settings(&settings.retry),
            prices: settings.pricing.clone(),
            params_allowed: settings.params_allowed.clone(),
            fallback: settings.fallback.clone(),
            fallback_on_refusal: settings.fallback_on_refusal,
            probe_every,
            pause: Mutex::new(None),
            paused_tx: watch::Sender::new(false),
        }
    }

    /// Why this provider cannot do what `request` asks (a size, a format, a field of
    /// `params` it does not take), naming the provider: the job fails before any call.
    pub fn refusal(&self, request: &ImageRequest) -> Option<String> {
        let caps = self.provider.capabilities();
        let why = caps
            .refusal(request)
            .or_else(|| caps.params_refusal(request, &self.params_allowed))?;
        Some(format!(
            "provider {} (kind {}) {why}",
            self.name,
            self.provider.kind()
        ))
    }

    /// Why a job of `request` must not be bought under a spend cap: its model has no price here
    /// (and no fallback price is set), so it would count as $0 against every cap.
    pub fn unpriced(&self, request: &ImageRequest) -> Option<String> {
        self.estimated_cost(request).is_none().then(|| {
            format!(
                "model {:?} of provider {} has no price, and a spend cap is set: add its price \
                 to [pricing] (or providers.{}.pricing), or set pricing.fallback_usd_per_image",
                request.model, self.name, self.name
            )
        })
    }

    /// What `request` would cost by this provider's estimate of its usage; `None` when its
    /// model has no price.
    pub fn estimated_cost(&self, request: &ImageRequest) -> Option<Cost> {
        let usage = self.provider.estimate(request);
        self.prices
            .cost(Purchase {
                model: &request.model,
                size: &request.size_text(),
                quality: request.quality.as_deref().unwrap_or(""),
                usage: &usage,
            })
            .map(|c| Cost {
                estimated: true,
                ..c
            })
    }

    fn state(&self) -> MutexGuard<'_, Option<Paused>> {
        self.pause.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Why the provider is paused, when it is.
    pub fn paused(&self) -> Option<(StopReason, String)> {
        self.state().as_ref().map(|p| (p.reason, p.message.clone()))
    }

    /// How long until the paused provider's next probe (zero when it is not paused).
    pub fn next_probe_in(&self) -> Duration {
        self.state().as_ref().map_or(Duration::ZERO, |p| {
            p.next_probe.saturating_duration_since(Instant::now())
        })
    }

    /// Resolves once the provider is paused (at once if it is).
    pub async fn until_paused(&self) {
        let mut rx = self.paused_tx.subscribe();
        let _ = rx.wait_for(|paused| *paused).await;
    }

    /// Whether a job may call now; `force`: the worker's own probe (every provider is paused).
    pub fn admit(&self, force: bool) -> Admission<'_> {
        let mut state = self.state();
        let Some(p) = state.as_mut() else {
            return Admission::Open;
        };
        let now = Instant::now();
        if force || (!p.probing && now >= p.next_probe) {
            p.probing = true;
            return Admission::Probe(ProbeGuard {
                route: self,
                settled: false,
            });
        }
        Admission::Paused(p.next_probe.saturating_duration_since(now))
    }

    /// The provider refuses every request: pause it (once; later refusals only update why).
    pub fn pause(&self, reason: StopReason, message: &str) {
        let mut state = self.state();
        let next_probe = Instant::now() + self.probe_every;
        match state.as_mut() {
            Some(p) => {
                p.reason = reason;
                p.message = message.to_string();
                p.next_probe = next_probe;
                p.probing = false;
            }
            None => {
                error!(provider = %self.name, %reason, error = %message,
                    "PROVIDER REFUSES ALL REQUESTS (quota, billing or credentials): its jobs wait in \
                     the delay queues; one job is tried every {} s and it resumes by itself when that \
                     job gets through", self.probe_every.as_secs());
                *state = Some(Paused {
                    reason,
                    message: message.to_string(),
                    next_probe,
                    probing: false,
                });
                super::metrics::provider_paused(&self.name, Some(&reason.to_string()));
                self.paused_tx.send_replace(true);
            }
        }
    }

    fn resume(&self) {
        if self.state().take().is_some() {
            info!(provider = %self.name, "the provider answers again: resuming it");
            super::metrics::provider_paused(&self.name, None);
            self.paused_tx.send_replace(false);
        }
    }
}

/// A probe in progress: it ends when the probe's answer is known, or when the job gives up
/// before calling (then the next job may probe).
pub struct ProbeGuard<'a> {
    route: &'a Route,
    settled: bool,
}

impl ProbeGuard<'_> {
    /// The provider answered with something other than a refusal of everything.
    pub fn through(mut self) {
        self.settled = true;
        self.route.resume();
    }
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if !self.settled
            && let Some(p) = self.route.state().as_mut()
        {
            p.probing = false;
        }
    }
}

/// Every configured provider.
pub struct Routes {
    routes: Vec<Arc<Route>>,
    default: usize,
    /// The answer memory the providers share (none for providers built by hand, in tests).
    memory: Option<BufferPool>,
}

impl Routes {
    /// Builds every configured provider.
    pub fn from_settings(settings: &Settings) -> anyhow::Result<Self> {
        let probe = Duration::from_secs(settings.worker.pause_probe_secs);
        let memory = BufferPool::new(settings.worker.answer_memory_bytes);
        let routes = settings
            .providers
            .iter()
            .map(|p| {
                Ok(Route::new(
                    &p.name,
                    crate::provider::build(p, &memory)?,
                    p,
                    probe,
                ))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            memory: Some(memory),
            ..Self::new(routes, &settings.worker.default_provider)
        })
    }

    /// `default`: the name of the provider of jobs that name none (the first when unknown).
    pub fn new(routes: Vec<Route>, default: &str) -> Self {
        let default = routes.iter().position(|r| r.name == default).unwrap_or(0);
        Self {
            routes: routes.into_iter().map(Arc::new).collect(),
            default,
            memory: None,
        }
    }

    /// The answer memory the providers share.
    pub fn memory(&self) -> Option<&BufferPool> {
        self.memory.as_ref()
    }

    /// The provider a job names, or the default one.
    pub fn get(&self, name: Option<&str>) -> Option<&Arc<Route>> {
        match name {
            None => self.routes.get(self.default),
            Some(name) => self.routes.iter().find(|r| r.name == name),
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.iter()
    }

    /// When every provider is paused: why the first one is.
    pub fn all_paused(&self) -> Option<(StopReason, String)> {
        let mut first = None;
        for route in &self.routes {
            let paused = route.paused()?;
            first.get_or_insert(paused);
        }
        first
    }

    /// The default provider's name, for logs.
    pub fn default_name(&self) -> &str {
        self.routes
            .get(self.default)
            .map_or("", |r| r.name.as_str())
    }
}
