//! `imagegen-fakes`: serves a provider's fake as its own process, for the benchmark (which measures
//! the fake's CPU apart from the worker's) and the compose demo. Tests use the library in-process.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use imagegen_fakes::{
    automatic1111, azure, bfl, comfyui, fal, gemini, openai, replicate, stability,
};
use tracing_subscriber::EnvFilter;

#[derive(Parser, Debug)]
#[command(
    name = "imagegen-fakes",
    version,
    about = "Fakes of the image providers' HTTP APIs (for tests, benchmarks and demos; no real images)"
)]
struct Cli {
    #[command(subcommand)]
    provider: Provider,
}

#[derive(Subcommand, Debug)]
enum Provider {
    /// Serve the fake OpenAI Images API.
    #[command(after_help = "Examples:
  imagegen-fakes openai --listen 127.0.0.1:8080 --latency-ms 500 --image-bytes 300000
  imagegen-fakes openai --rpm 60   # an account limited to 60 requests a minute (429 beyond)
  imagegen-fakes openai --latency-ms 10000 --jitter-ms 5000 --seed 7   # 5 to 15 s, seeded
  imagegen-fakes openai --tick-ms 10000   # every answer at the next 10 s tick
  imagegen-fakes openai --batch-window-ms 20000 --batch-line-ms 50   # a \"24h\" batch window of 20 s
  curl -H 'content-type: application/json' localhost:8080/_fake/rules -d '{\"fault\":{\"kind\":\"moderation\"},\"prompt_contains\":\"fox\",\"times\":1}'")]
    Openai {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Latency added to every answer, in milliseconds (the mean, with --jitter-ms).
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Each call's latency is drawn uniformly from latency +- jitter, in milliseconds.
        #[arg(long, default_value_t = 0)]
        jitter_ms: u64,
        /// Seeds the jitter: the n-th call gets the same latency in every run with this seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Hold each answer until the next multiple of this many milliseconds (counted from the
        /// first call) after its latency: calls are answered in waves, all at one moment.
        #[arg(long)]
        tick_ms: Option<u64>,
        /// Approximate size of each generated image, in bytes.
        #[arg(long, default_value_t = 2048)]
        image_bytes: usize,
        /// Width and height of each generated image, in pixels (a real picture, padded to
        /// --image-bytes: a client that decodes or resizes it does real work).
        #[arg(long, default_value_t = 64)]
        image_side: u32,
        /// Enforce this many requests per minute (429 beyond it), like an account's RPM limit.
        #[arg(long)]
        rpm: Option<u64>,
        /// Enforce this many tokens per minute (a request costs its usage), like a TPM limit.
        #[arg(long)]
        tpm: Option<u64>,
        /// What a batch's "24h" completion window lasts, in milliseconds (Batch API).
        #[arg(long, default_value_t = 60_000)]
        batch_window_ms: u64,
        /// The simulated work of one batch line, in milliseconds (Batch API).
        #[arg(long, default_value_t = 2)]
        batch_line_ms: u64,
    },
    /// Serve the fake Black Forest Labs API (submit, poll, download).
    #[command(after_help = "Examples:
  imagegen-fakes bfl --listen 127.0.0.1:8081 --generation-ms 20000 --max-active 24
  curl -H 'content-type: application/json' localhost:8081/_fake/rules -d '{\"fault\":{\"kind\":\"request_moderated\"},\"prompt_contains\":\"fox\"}'")]
    Bfl {
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: String,
        /// How long a task takes to make its image, in milliseconds.
        #[arg(long, default_value_t = 20_000)]
        generation_ms: u64,
        /// The account's cap on active tasks (429 above it).
        #[arg(long, default_value_t = 24)]
        max_active: usize,
        /// Approximate size of each generated image, in bytes.
        #[arg(long, default_value_t = 2048)]
        image_bytes: usize,
    },
    /// Serve the fake Gemini API (generateContent with image output).
    #[command(after_help = "Example:
  imagegen-fakes gemini --listen 127.0.0.1:8082 --latency-ms 2000   # base URL http://127.0.0.1:8082/v1beta")]
    Gemini {
        #[arg(long, default_value = "127.0.0.1:8082")]
        listen: String,
        /// Latency added to every answer, in milliseconds.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Approximate size of each generated image, in bytes.
        #[arg(long, default_value_t = 2048)]
        image_bytes: usize,
    },
    /// Serve the fake Azure OpenAI resource, and its Entra ID token endpoint.
    #[command(after_help = "Example:
  imagegen-fakes azure --listen 127.0.0.1:8083 --api-key azure-demo-key   # endpoint http://127.0.0.1:8083")]
    Azure {
        #[arg(long, default_value = "127.0.0.1:8083")]
        listen: String,
        /// The resource's key (the api-key header).
        #[arg(long, default_value = "azure-test-key")]
        api_key: String,
        /// Approximate size of each generated image, in bytes.
        #[arg(long, default_value_t = 2048)]
        image_bytes: usize,
    },
    /// Serve the fake Stability AI API (v2beta Stable Image).
    #[command(after_help = "Example:
  imagegen-fakes stability --listen 127.0.0.1:8084 --latency-ms 3000   # base URL http://127.0.0.1:8084")]
    Stability {
        #[arg(long, default_value = "127.0.0.1:8084")]
        listen: String,
        /// Latency added to every answer, in milliseconds.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Approximate size of each generated image, in bytes.
        #[arg(long, default_value_t = 2048)]
        image_bytes: usize,
    },
    /// Serve the fake Replicate API (predictions: create, poll, download).
    #[command(after_help = "Example:
  imagegen-fakes replicate --listen 127.0.0.1:8085 --generation-ms 5000   # base URL http://127.0.0.1:8085")]
    Replicate {
        #[arg(long, default_value = "127.0.0.1:8085")]
        listen: String,
        /// How long a prediction runs, in milliseconds.
        #[arg(long, default_value_t = 5_000)]
        generation_ms: u64,
        /// Approximate size of each generated image, in bytes.
        #[arg(long, default_value_t = 2048)]
        image_bytes: usize,
    },
    /// Serve the fake fal queue (submit, status, result, download).
    #[command(after_help = "Example:
  imagegen-fakes fal --listen 127.0.0.1:8086 --generation-ms 4000   # base URL http://127.0.0.1:8086")]
    Fal {
        #[arg(long, default_value = "127.0.0.1:8086")]
        listen: String,
        /// How long a request takes, in milliseconds.
        #[arg(long, default_value_t = 4_000)]
        generation_ms: u64,
        /// Approximate size of each generated image, in bytes.
        #[arg(long, default_value_t = 2048)]
        image_bytes: usize,
    },
    /// Serve a fake ComfyUI server (one GPU: prompts run one at a time).
    #[command(after_help = "Example:
  imagegen-fakes comfyui --listen 127.0.0.1:8188 --generation-ms 3000   # hosts = [\"http://127.0.0.1:8188\"]")]
    Comfyui {
        #[arg(long, default_value = "127.0.0.1:8188")]
        listen: String,
        /// How long one prompt runs, in milliseconds.
        #[arg(long, default_value_t = 3_000)]
        generation_ms: u64,
        /// Approximate size of each saved image, in bytes.
        #[arg(long, default_value_t = 2048)]
        image_bytes: usize,
    },
    /// Serve a fake AUTOMATIC1111 web UI API (calls run one at a time).
    #[command(after_help = "Example:
  imagegen-fakes automatic1111 --listen 127.0.0.1:7860 --generation-ms 3000")]
    Automatic1111 {
        #[arg(long, default_value = "127.0.0.1:7860")]
        listen: String,
        /// How long one call's run takes, in milliseconds.
        #[arg(long, default_value_t = 3_000)]
        generation_ms: u64,
        /// Approximate size of each image, in bytes.
        #[arg(long, default_value_t = 2048)]
        image_bytes: usize,
    },
}

/// The fake being served.
enum Fake {
    Openai(openai::FakeApi),
    Bfl(bfl::BflFake),
    Gemini(gemini::GeminiFake),
    Azure(azure::AzureFake),
    Stability(stability::StabilityFake),
    Replicate(replicate::ReplicateFake),
    Fal(fal::FalFake),
    Comfyui(comfyui::ComfyFake),
    Automatic1111(automatic1111::A1111Fake),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .compact()
        .init();
    let (listen, app) = match cli.provider {
        Provider::Openai {
            listen,
            latency_ms,
            jitter_ms,
            seed,
            tick_ms,
            image_bytes,
            image_side,
            rpm,
            tpm,
            batch_window_ms,
            batch_line_ms,
        } => {
            let api = openai::FakeApi::new(openai::FakeOptions {
                latency: Duration::from_millis(latency_ms),
                jitter: Duration::from_millis(jitter_ms),
                seed,
                tick: tick_ms.map(Duration::from_millis),
                image_bytes,
                image_side,
                requests_per_minute: rpm,
                tokens_per_minute: tpm,
                batch: openai::BatchOptions {
                    window: Duration::from_millis(batch_window_ms),
                    per_line: Duration::from_millis(batch_line_ms),
                    ..Default::default()
                },
                ..Default::default()
            });
            (listen, Fake::Openai(api))
        }
        Provider::Bfl {
            listen,
            generation_ms,
            max_active,
            image_bytes,
        } => {
            let api = bfl::BflFake::new(bfl::BflOptions {
                generation: Duration::from_millis(generation_ms),
                max_active,
                image_bytes,
                ..Default::default()
            });
            (listen, Fake::Bfl(api))
        }
        Provider::Gemini {
            listen,
            latency_ms,
            image_bytes,
        } => {
            let api = gemini::GeminiFake::new(gemini::GeminiOptions {
                latency: Duration::from_millis(latency_ms),
                image_bytes,
                ..Default::default()
            });
            (listen, Fake::Gemini(api))
        }
        Provider::Azure {
            listen,
            api_key,
            image_bytes,
        } => {
            let api = azure::AzureFake::new(azure::AzureOptions {
                api_key,
                image_bytes,
                ..Default::default()
            });
            (listen, Fake::Azure(api))
        }
        Provider::Stability {
            listen,
            latency_ms,
            image_bytes,
        } => {
            let api = stability::StabilityFake::new(stability::StabilityOptions {
                latency: Duration::from_millis(latency_ms),
                image_bytes,
                ..Default::default()
            });
            (listen, Fake::Stability(api))
        }
        Provider::Replicate {
            listen,
            generation_ms,
            image_bytes,
        } => {
            let api = replicate::ReplicateFake::new(replicate::ReplicateOptions {
                generation: Duration::from_millis(generation_ms),
                image_bytes,
                ..Default::default()
            });
            (listen, Fake::Replicate(api))
        }
        Provider::Fal {
            listen,
            generation_ms,
            image_bytes,
        } => {
            let api = fal::FalFake::new(fal::FalOptions {
                generation: Duration::from_millis(generation_ms),
                image_bytes,
                ..Default::default()
            });
            (listen, Fake::Fal(api))
        }
        Provider::Comfyui {
            listen,
            generation_ms,
            image_bytes,
        } => {
            let api = comfyui::ComfyFake::new(comfyui::ComfyOptions {
                generation: Duration::from_millis(generation_ms),
                image_bytes,
                ..Default::default()
            });
            (listen, Fake::Comfyui(api))
        }
        Provider::Automatic1111 {
            listen,
            generation_ms,
            image_bytes,
        } => {
            let api = automatic1111::A1111Fake::new(automatic1111::A1111Options {
                generation: Duration::from_millis(generation_ms),
                image_bytes,
                ..Default::default()
            });
            (listen, Fake::Automatic1111(api))
        }
    };
    let listener = match tokio::net::TcpListener::bind(&listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen on {listen}");
            return ExitCode::FAILURE;
        }
    };
    match listener.local_addr() {
        Ok(addr) => {
            tracing::info!(address = %addr, "fake image API listening on http://{addr}");
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot listen on {listen}");
            return ExitCode::FAILURE;
        }
    }
    let served = async {
        match app {
            Fake::Openai(api) => openai::serve(listener, api).await,
            Fake::Bfl(api) => bfl::serve(listener, api).await,
            Fake::Gemini(api) => gemini::serve(listener, api).await,
            Fake::Azure(api) => azure::serve(listener, api).await,
            Fake::Stability(api) => stability::serve(listener, api).await,
            Fake::Replicate(api) => replicate::serve(listener, api).await,
            Fake::Fal(api) => fal::serve(listener, api).await,
            Fake::Comfyui(api) => comfyui::serve(listener, api).await,
            Fake::Automatic1111(api) => automatic1111::serve(listener, api).await,
        }
    };
    tokio::select! {
        served = served => {
            if let Err(e) = served {
                tracing::error!(error = %e, "fake image API stopped");
                return ExitCode::FAILURE;
            }
        }
        () = stop_requested() => tracing::info!("stop requested"),
    }
    ExitCode::SUCCESS
}

/// SIGINT (a terminal) or SIGTERM (the benchmark, docker stop).
async fn stop_requested() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
