//! `imagegen gallery`: a static, self-contained HTML contact sheet of a batch.
//!
//! `{out}/index.html` holds the page, its style, its script and the batch's data (one JSON
//! array); `{out}/thumbs/` the thumbnails (at most 256 px, JPEG, made here); with `--download`,
//! `{out}/images/` the full images. The page shows one page of cards at a time, filterable by
//! status, so that a batch of 10,000 jobs stays usable. Full images are linked by presigned URLs
//! (S3), by relative paths (fs), or to the downloaded copies.

use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use serde::Serialize;

use super::output::{EXIT_PARTIAL, progress_bar};
use super::watch::Progress;
use crate::config::Settings;
use crate::domain::event::Status;
use crate::storage::ObjectStore;
use crate::storage::batches as batch;

/// Largest side of a thumbnail, in pixels.
pub const THUMB_SIDE: u32 = 256;
/// Images fetched and thumbnailed at once.
const CONCURRENCY: usize = 4;

pub struct Options {
    pub out: PathBuf,
    pub download: bool,
    pub link_ttl: Duration,
    pub page_size: usize,
}

/// A job's image: (job id, index).
type ImageId = (String, u32);
/// (thumbnail, full image) links of an image.
type Links = (String, String);

/// One card of the page.
#[derive(Debug, Serialize)]
struct Card {
    id: String,
    prompt: String,
    status: &'static str,
    size: String,
    model: String,
    cost: Option<f64>,
    error: Option<String>,
    /// (thumbnail, full image) per image.
    images: Vec<(String, String)>,
    /// (label, link) of each variant of each image (the job's outputs).
    variants: Vec<(String, String)>,
    /// (reference as the job named it, link when there is one) of each reference image, the
    /// mask last.
    references: Vec<(String, Option<String>)>,
}

/// `imagegen gallery`.
pub async fn command(
    settings: &Settings,
    batch: &str,
    options: &Options,
) -> anyhow::Result<ExitCode> {
    let store = crate::storage::from_settings(settings).await?;
    let prefix = &settings.storage.prefix;
    let record = batch::load(&*store, prefix, batch)
        .await?
        .with_context(|| {
            format!(
                "no record of batch {batch:?} in the store: was it enqueued with --batch {batch}?"
            )
        })?;
    let mut progress = Progress::new(record);
    for event in batch::stored_results(&store, prefix, batch).await? {
        progress.apply(event);
    }
    let out = &options.out;
    std::fs::create_dir_all(out.join("thumbs"))
        .with_context(|| format!("cannot create {}", out.display()))?;
    if options.download {
        std::fs::create_dir_all(out.join("images"))?;
    }

    // Every stored image: (job id, index, key, extension).
    let images: Vec<(String, u32, String, String)> = progress
        .outcomes()
        .filter(|e| e.data.status == Status::Succeeded)
        .flat_map(|e| {
            e.data.images.iter().map(|i| {
                let ext = i.key.rsplit('.').next().unwrap_or("bin").to_string();
                (e.data.job_id.clone(), i.index, i.key.clone(), ext)
            })
        })
        .collect();
    let bar = progress_bar(images.len() as u64, "thumbnails");
    let results: Vec<anyhow::Result<(ImageId, Links)>> = futures_util::stream::iter(images)
        .map(|(job, index, key, ext)| {
            let store = store.clone();
            async move {
                let links = image_links(&store, out, options, &job, index, &key, &ext).await?;
                Ok(((job, index), links))
            }
        })
        .buffer_unordered(CONCURRENCY)
        .inspect(|_| bar.inc(1))
        .collect()
        .await;
    bar.finish_and_clear();
    let mut links = std::collections::HashMap::new();
    let mut broken = 0;
    for result in results {
        match result {
            Ok((id, l)) => {
                links.insert(id, l);
            }
            Err(e) => {
                broken += 1;
                tracing::warn!(error = %format!("{e:#}"), "an image could not be added to the gallery");
            }
        }
    }

    let mut cards = Vec::with_capacity(progress.total());
    for (id, job) in &progress.record().jobs {
        let outcome = progress.outcomes().find(|e| &e.data.job_id == id);
        let data = outcome.map(|e| &e.data);
        let status = match data.map(|d| d.status) {
            Some(Status::Succeeded) => "succeeded",
            Some(Status::Failed) => "failed",
            None => "pending",
        };
        let images = data
            .map(|d| {
                d.images
                    .iter()
                    .filter_map(|i| links.get(&(id.clone(), i.index)).cloned())
                    .collect()
            })
            .unwrap_or_default();
        let mut variants = Vec::new();
        for image in data.map(|d| d.images.as_slice()).unwrap_or_default() {
            for v in &image.variants {
                let ext = v.key.rsplit('.').next().unwrap_or("bin");
                let copy = format!("images/{id}-{}-{}.{ext}", image.index, v.name);
                match link_to(&store, out, options, &v.key, &copy).await {
                    Ok(link) => variants.push((
                        format!("{} #{} {}x{}", v.name, image.index, v.width, v.height),
                        link,
                    )),
                    Err(e) => {
                        broken += 1;
                        tracing::warn!(error = %format!("{e:#}"), "a variant could not be added to the gallery");
                    }
                }
            }
        }
        let mut references = Vec::new();
        let named = data
            .map(|d| {
                d.references
                    .iter()
                    .map(|r| (r.clone(), r.clone()))
                    .chain(d.mask.iter().map(|m| (format!("mask {m}"), m.clone())))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        for (label, reference) in named {
            let link = if reference.starts_with("https://") || reference.starts_with("http://") {
                Some(reference)
            } else if reference.starts_with("job:") {
                None
            } else {
                let ext = reference.rsplit('.').next().unwrap_or("bin");
                let copy = format!("images/{id}-reference-{}.{ext}", references.len());
                link_to(&store, out, options, &reference, &copy).await.ok()
            };
            references.push((label, link));
        }
        cards.push(Card {
            id: id.clone(),
            prompt: job.prompt.clone(),
            status,
            size: job.size.clone(),
            model: data
                .and_then(|d| d.model.clone())
                .unwrap_or_else(|| job.model.clone()),
            cost: data.and_then(|d| d.cost_usd),
            error: data
                .and_then(|d| d.error.as_ref())
                .map(|e| format!("{}: {}", e.kind, e.message)),
            images,
            variants,
            references,
        });
    }
    let html = page(batch, &cards, options.page_size)?;
    let index = out.join("index.html");
    std::fs::write(&index, html).with_context(|| format!("cannot write {}", index.display()))?;
    eprintln!(
        "gallery of batch {batch}: {} jobs ({} succeeded, {} failed, {} pending), {} images{}: {}",
        progress.total(),
        progress.succeeded(),
        progress.failed(),
        progress.total() - progress.succeeded() - progress.failed(),
        links.len(),
        if broken > 0 {
            format!(" ({broken} could not be read)")
        } else {
            String::new()
        },
        index.display()
    );
    Ok(if broken > 0 {
        ExitCode::from(EXIT_PARTIAL)
    } else {
        ExitCode::SUCCESS
    })
}

/// Makes (or reuses) an image's thumbnail, and finds the link to the full image.
async fn image_links(
    store: &Arc<dyn ObjectStore>,
    out: &Path,
    options: &Options,
    job: &str,
    index: u32,
    key: &str,
    ext: &str,
) -> anyhow::Result<Links> {
    let thumb = format!("thumbs/{job}-{index}.jpg");
    let full_copy = format!("images/{job}-{index}.{ext}");
    let thumb_path = out.join(&thumb);
    let need_thumb = !thumb_path.exists();
    let need_copy = options.download && !out.join(&full_copy).exists();
    if need_thumb || need_copy {
        let data = store
            .get(key)
            .await?
            .with_context(|| format!("{key} is not in the store"))?;
        if need_copy {
            tokio::fs::write(out.join(&full_copy), &data).await?;
        }
        if need_thumb {
            let jpeg = tokio::task::spawn_blocking(move || thumbnail(&data)).await??;
            tokio::fs::write(&thumb_path, jpeg).await?;
        }
    }
    let full = if options.download {
        full_copy
    } else {
        link_to(store, out, options, key, &full_copy).await?
    };
    Ok((thumb, full))
}

/// The link to a stored object: `copy` (a path under `out`, written when missing) with
/// `--download`, else a presigned URL, else a path to a local store's file.
async fn link_to(
    store: &Arc<dyn ObjectStore>,
    out: &Path,
    options: &Options,
    key: &str,
    copy: &str,
) -> anyhow::Result<String> {
    if options.download {
        if !out.join(copy).exists() {
            let data = store
                .get(key)
                .await?
                .with_context(|| format!("{key} is not in the store"))?;
            tokio::fs::write(out.join(copy), &data).await?;
        }
        return Ok(copy.to_string());
    }
    if let Some(url) = store.presigned_get(key, options.link_ttl).await? {
        return Ok(url);
    }
    if let Some(path) = store.local_path(key) {
        return relative_link(out, &path);
    }
    anyhow::bail!("the store gives no link to {key}: use --download")
}

/// A JPEG of at most [`THUMB_SIDE`] pixels a side.
pub fn thumbnail(data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let image = image::load_from_memory(data).context("the image cannot be decoded")?;
    let small = image.thumbnail(THUMB_SIDE, THUMB_SIDE).to_rgb8();
    let mut out = std::io::Cursor::new(Vec::new());
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 82).encode_image(&small)?;
    Ok(out.into_inner())
}

/// A relative URL from the directory `from` to the file `to`.
fn relative_link(from: &Path, to: &Path) -> anyhow::Result<String> {
    let from = std::path::absolute(from)?;
    let to = std::path::absolute(to)?;
    let normal = |p: &Path| -> Vec<String> {
        p.components()
            .filter_map(|c| match c {
                Component::Normal(s) => Some(s.to_string_lossy().into_owned()),
                _ => None,
            })
            .collect()
    };
    let (from, to) = (normal(&from), normal(&to));
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = vec!["..".to_string(); from.len() - common];
    parts.extend(to[common..].iter().map(|p| {
        p.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    }));
    Ok(parts.join("/"))
}

fn escape_html(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn page(batch: &str, cards: &[Card], page_size: usize) -> anyhow::Result<String> {
    // Inside <script>, "</" would end the element: JSON allows "<\/" for it.
    let data = serde_json::to_string(cards)?.replace("</", "<\\/");
    let title = escape_html(batch);
    Ok(format!(
        r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · imagegen</title>
<link rel="icon" href="data:,">
<style>
  body {{ font: 14px/1.4 system-ui, sans-serif; margin: 0; background: #f4f4f5; color: #18181b; }}
  header {{ position: sticky; top: 0; background: #fff; border-bottom: 1px solid #e4e4e7; padding: 10px 16px;
           display: flex; gap: 12px; align-items: center; flex-wrap: wrap; z-index: 1; }}
  h1 {{ font-size: 16px; margin: 0 12px 0 0; }}
  button {{ font: inherit; border: 1px solid #d4d4d8; background: #fff; border-radius: 6px; padding: 3px 10px; cursor: pointer; }}
  button[aria-pressed="true"] {{ background: #18181b; color: #fff; border-color: #18181b; }}
  button:disabled {{ opacity: .4; cursor: default; }}
  #grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(220px, 1fr)); gap: 12px; padding: 16px; }}
  .card {{ background: #fff; border: 1px solid #e4e4e7; border-radius: 8px; overflow: hidden; display: flex; flex-direction: column; }}
  .card.failed {{ border-color: #fca5a5; }}
  .thumbs {{ display: flex; flex-wrap: wrap; gap: 2px; background: #27272a; min-height: 64px; }}
  .thumbs a {{ flex: 1 1 100px; }}
  .thumbs img {{ display: block; width: 100%; height: auto; }}
  .meta {{ padding: 8px 10px; }}
  .prompt {{ margin: 0 0 6px; word-break: break-word; }}
  .small {{ color: #71717a; font-size: 12px; }}
  .error {{ color: #b91c1c; font-size: 12px; margin-top: 4px; word-break: break-word; }}
  .badge {{ font-size: 11px; border-radius: 4px; padding: 0 5px; margin-right: 4px; }}
  .succeeded .badge {{ background: #dcfce7; }} .failed .badge {{ background: #fee2e2; }} .pending .badge {{ background: #e4e4e7; }}
  #pager {{ display: flex; gap: 6px; align-items: center; margin-left: auto; }}
</style>
</head>
<body>
<header>
  <h1>{title}</h1>
  <span id="counts" class="small"></span>
  <span id="filters"></span>
  <span id="pager"><button id="prev">‹ prev</button><span id="page" class="small"></span><button id="next">next ›</button></span>
</header>
<main id="grid"></main>
<script id="data" type="application/json">{data}</script>
<script>
"use strict";
const JOBS = JSON.parse(document.getElementById("data").textContent);
const PAGE_SIZE = {page_size};
const state = {{ filter: "all", page: 0 }};
const grid = document.getElementById("grid");
const el = (tag, attrs, text) => {{
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {{}})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}};
function shown() {{
  return state.filter === "all" ? JOBS : JOBS.filter(j => j.status === state.filter);
}}
function card(job) {{
  const c = el("article", {{ class: "card " + job.status, "data-status": job.status, "data-id": job.id }});
  const thumbs = el("div", {{ class: "thumbs" }});
  for (const [thumb, full] of job.images) {{
    const a = el("a", {{ href: full, target: "_blank", rel: "noopener" }});
    a.append(el("img", {{ src: thumb, alt: job.prompt, loading: "eager", width: "256" }}));
    thumbs.append(a);
  }}
  c.append(thumbs);
  if (job.references.length) {{
    const rs = el("div", {{ class: "references small" }}, "references: ");
    for (const [label, link] of job.references) {{
      rs.append(link ? el("a", {{ href: link, target: "_blank", rel: "noopener", class: "badge" }}, label)
                     : el("span", {{ class: "badge" }}, label));
    }}
    c.append(rs);
  }}
  if (job.variants.length) {{
    const vs = el("div", {{ class: "variants small" }});
    for (const [label, link] of job.variants) {{
      vs.append(el("a", {{ href: link, target: "_blank", rel: "noopener", class: "badge" }}, label));
    }}
    c.append(vs);
  }}
  const meta = el("div", {{ class: "meta" }});
  meta.append(el("p", {{ class: "prompt" }}, job.prompt));
  const line = el("div", {{ class: "small" }});
  line.append(el("span", {{ class: "badge" }}, job.status));
  const cost = job.cost === null ? "" : " · $" + job.cost.toFixed(4);
  line.append(document.createTextNode(job.size + " · " + job.model + cost));
  meta.append(line);
  if (job.error) meta.append(el("div", {{ class: "error" }}, job.error));
  c.append(meta);
  return c;
}}
function render() {{
  const jobs = shown();
  const pages = Math.max(1, Math.ceil(jobs.length / PAGE_SIZE));
  state.page = Math.min(state.page, pages - 1);
  grid.replaceChildren(...jobs.slice(state.page * PAGE_SIZE, (state.page + 1) * PAGE_SIZE).map(card));
  document.getElementById("page").textContent = "page " + (state.page + 1) + " of " + pages;
  document.getElementById("prev").disabled = state.page === 0;
  document.getElementById("next").disabled = state.page >= pages - 1;
  for (const b of document.querySelectorAll("#filters button"))
    b.setAttribute("aria-pressed", String(b.dataset.filter === state.filter));
}}
const count = s => JOBS.filter(j => j.status === s).length;
document.getElementById("counts").textContent = JOBS.length + " jobs · " + count("succeeded") + " succeeded · "
  + count("failed") + " failed · " + count("pending") + " pending";
for (const f of ["all", "succeeded", "failed", "pending"]) {{
  const b = el("button", {{ "data-filter": f }}, f);
  b.addEventListener("click", () => {{ state.filter = f; state.page = 0; render(); }});
  document.getElementById("filters").append(b);
}}
document.getElementById("prev").addEventListener("click", () => {{ state.page--; render(); }});
document.getElementById("next").addEventListener("click", () => {{ state.page++; render(); }});
render();
</script>
</body>
</html>
"##
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbnails_are_at_most_256_pixels_a_side() {
        let mut png = Vec::new();
        let big = image::RgbImage::from_fn(1024, 512, |x, y| image::Rgb([x as u8, y as u8, 7]));
        big.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        let jpeg = thumbnail(&png).unwrap();
        let small = image::load_from_memory(&jpeg).unwrap();
        assert_eq!((small.width(), small.height()), (256, 128));
        assert!(thumbnail(b"not an image").is_err());
    }

    #[test]
    fn relative_links_climb_out_of_the_gallery() {
        let link = relative_link(
            Path::new("/tmp/g/out"),
            Path::new("/tmp/data/images/b/j 1/0.png"),
        )
        .unwrap();
        assert_eq!(link, "../../data/images/b/j%201/0.png");
    }

    #[test]
    fn the_page_cannot_be_broken_out_of_by_a_prompt() {
        let cards = [Card {
            id: "x".into(),
            prompt: "</script><script>alert(1)</script>".into(),
            status: "failed",
            size: "1024x1024".into(),
            model: "m".into(),
            cost: None,
            error: Some("content_policy: no".into()),
            images: vec![],
            variants: vec![],
            references: vec![],
        }];
        let html = page("<b>", &cards, 10).unwrap();
        assert!(!html.contains("</script><script>alert"));
        assert!(html.contains("<title>&lt;b&gt; · imagegen</title>"));
    }
}
