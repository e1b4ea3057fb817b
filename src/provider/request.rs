//! The neutral request every provider is asked with, and what each provider declares it can do.
//!
//! A job says what it wants in the provider-neutral fields of the contract (prompt, negative
//! prompt, size, count, format, quality, background, seed); each provider maps them to its own
//! vocabulary, and passes the job's `params` through as its own fields. A provider declares its
//! [`Capabilities`], so that a job asking for what it cannot do is refused before any call, with
//! a message that says what it accepts, and so that the worker makes as many calls as a job's
//! `n` needs when the provider gives fewer images per call.

use serde_json::{Map, Value};

use crate::domain::job::Job;

/// The size a job asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Size {
    /// Whatever the provider picks (`auto`).
    Auto,
    /// Exact pixels: `1024x1536`.
    Pixels { width: u32, height: u32 },
    /// An aspect ratio, the provider picking the pixels: `16:9`.
    Aspect { width: u32, height: u32 },
    /// Anything else: a provider that takes size strings gets it as written.
    Named(String),
}

impl Size {
    /// Reads a job's `size`: `WxH`, `W:H`, `auto`, or an open string.
    pub fn parse(s: &str) -> Size {
        let pair = |sep: char| {
            let (a, b) = s.split_once(sep)?;
            let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
            if !(digits(a) && digits(b)) {
                return None;
            }
            let (a, b) = (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?);
            (a > 0 && b > 0).then_some((a, b))
        };
        if s == "auto" {
            Size::Auto
        } else if let Some((width, height)) = pair('x') {
            Size::Pixels { width, height }
        } else if let Some((width, height)) = pair(':') {
            Size::Aspect { width, height }
        } else {
            Size::Named(s.to_string())
        }
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Size::Auto => f.write_str("auto"),
            Size::Pixels { width, height } => write!(f, "{width}x{height}"),
            Size::Aspect { width, height } => write!(f, "{width}:{height}"),
            Size::Named(s) => f.write_str(s),
        }
    }
}

/// What a provider fills in for the fields a job leaves out (from its settings).
#[derive(Debug, Clone, PartialEq)]
pub struct JobDefaults {
    pub model: String,
    pub size: String,
    /// `None`: not sent unless the job sets it.
    pub quality: Option<String>,
    pub output_format: Option<String>,
    pub background: Option<String>,
}

/// One call's request, in the provider-neutral vocabulary.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageRequest {
    pub model: String,
    pub prompt: String,
    pub negative_prompt: Option<String>,
    pub size: Size,
    /// Images asked for in this call.
    pub count: u8,
    pub output_format: Option<String>,
    pub quality: Option<String>,
    pub background: Option<String>,
    pub seed: Option<u64>,
    /// The job's provider-specific fields, passed through as they are.
    pub params: Map<String, Value>,
    /// How many reference images the job gives, and whether a mask (known before they are read).
    pub reference_count: u8,
    pub masked: bool,
    /// The reference images, once read (empty until then).
    pub refs: super::reference::Resolved,
}

impl ImageRequest {
    /// The request for `count` of a job's images, the provider's defaults filling the gaps.
    pub fn for_job(job: &Job, defaults: &JobDefaults, count: u8) -> Self {
        let or = |v: &Option<String>, d: &Option<String>| v.clone().or_else(|| d.clone());
        Self {
            model: job.model.clone().unwrap_or_else(|| defaults.model.clone()),
            prompt: job.prompt.clone(),
            negative_prompt: job.negative_prompt.clone(),
            size: Size::parse(job.size.as_deref().unwrap_or(&defaults.size)),
            count,
            output_format: or(&job.output_format, &defaults.output_format),
            quality: or(&job.quality, &defaults.quality),
            background: or(&job.background, &defaults.background),
            seed: job.seed,
            params: job.params.clone(),
            reference_count: job.images.len() as u8,
            masked: job.mask.is_some(),
            refs: super::reference::Resolved::default(),
        }
    }

    /// The size as the job wrote it (or the default's), for prices and records.
    pub fn size_text(&self) -> String {
        self.size.to_string()
    }
}

/// The usage a self-hosted server's request is estimated at before it runs: its images, at
/// `seconds_per_image` of GPU time each.
pub fn gpu_estimate(request: &ImageRequest, seconds_per_image: f64) -> crate::domain::cost::Usage {
    crate::domain::cost::Usage {
        images: request.count.into(),
        gpu_seconds: seconds_per_image * f64::from(request.count),
        estimated: true,
        ..Default::default()
    }
}

/// How a provider answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The images come back in the answer to the request.
    Synchronous,
    /// The request is queued; the provider gives a handle to poll until the images are ready.
    SubmitAndPoll,
}

/// The sizes a provider can express.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sizes {
    /// Any size string, passed through (the provider refuses what it does not know).
    Any,
    /// `WIDTHxHEIGHT` (or `auto`): each side a multiple of `multiple_of` between it and
    /// `max_side`, and at most `max_pixels` in all.
    Pixels {
        max_side: u32,
        multiple_of: u32,
        max_pixels: u64,
    },
    /// Only these aspect ratios (`W:H`), and `auto`.
    Aspects(&'static [&'static str]),
    /// Aspect ratios, each made at resolution tiers named by the provider (`1K`, `2K`, `4K`),
    /// each given with the longest side it makes. A job asks for `W:H` (the smallest tier),
    /// `auto`, or `WIDTHxHEIGHT` whose ratio is one of them (within 2.5 %, as the providers' own sizes are:
    /// 1344x768 for 16:9), made at the smallest
    /// tier whose long side reaches its own: see [`aspect_tier`].
    AspectTiers {
        ratios: &'static [&'static str],
        tiers: &'static [(&'static str, u32)],
    },
}

/// What a provider of [`Sizes::AspectTiers`] makes of a size: the aspect ratio and the tier to
/// ask for (`None`: the provider's own choice), or why it cannot make it.
pub fn aspect_tier(
    ratios: &[&'static str],
    tiers: &[(&'static str, u32)],
    size: &Size,
) -> Result<(Option<&'static str>, Option<&'static str>), String> {
    let accepts = || {
        format!(
            "takes sizes as one of the aspect ratios {}, as WIDTHxHEIGHT of one of those ratios \
             with the long side at most {} (tiers {}), or auto",
            ratios.join(", "),
            tiers.last().map_or(0, |t| t.1),
            tiers
                .iter()
                .map(|(name, side)| format!("{name} up to {side}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let ratio_of = |w: u32, h: u32| {
        ratios.iter().copied().find(|r| {
            let Size::Aspect { width, height } = Size::parse(r) else {
                return false;
            };
            let (want, got) = (width as f64 / height as f64, w as f64 / h as f64);
            (got / want - 1.0).abs() <= 0.025
        })
    };
    match size {
        Size::Auto => Ok((None, None)),
        Size::Aspect { .. } => match ratios.iter().find(|r| **r == size.to_string()) {
            Some(r) => Ok((Some(*r), None)),
            None => Err(format!("{}, not {size}", accepts())),
        },
        Size::Pixels { width, height } => {
            let ratio = ratio_of(*width, *height);
            let long = (*width).max(*height);
            let tier = tiers.iter().find(|(_, side)| *side >= long).map(|t| t.0);
            match (ratio, tier) {
                (Some(r), Some(t)) => Ok((Some(r), Some(t))),
                _ => Err(format!("{}, not {size}", accepts())),
            }
        }
        Size::Named(_) => Err(format!("{}, not {size}", accepts())),
    }
}

/// What a provider can do, declared by its driver.
#[derive(Debug, Clone, PartialEq)]
pub struct Capabilities {
    /// Most images one call returns; a job wanting more gets several calls.
    pub images_per_call: u8,
    pub sizes: Sizes,
    /// Output formats it can produce; `None`: any (passed through).
    pub formats: Option<&'static [&'static str]>,
    pub seed: bool,
    pub negative_prompt: bool,
    /// Whether it can make a transparent background.
    pub transparency: bool,
    pub mode: Mode,
    /// Most reference images one request takes (a job's `images`); 0: none.
    pub references: u8,
    /// Whether it takes a mask (an edit of the first reference where the mask is transparent).
    pub mask: bool,
    /// The request fields of its own API that a job may set through `params` (an allow-list:
    /// anything else, `"N"` or `"n "` included, is refused before any call). A provider's
    /// config extends it with `params_allowed`.
    pub params: &'static [&'static str],
}

impl Capabilities {
    /// Why the provider cannot do what the request asks, in words a producer can act on.
    pub fn refusal(&self, request: &ImageRequest) -> Option<String> {
        if request.reference_count > self.references {
            return Some(match self.references {
                0 => format!(
                    "takes no reference images; the job gives {}",
                    request.reference_count
                ),
                n => format!(
                    "takes at most {n} reference images; the job gives {}",
                    request.reference_count
                ),
            });
        }
        if request.masked && !self.mask {
            return Some("takes no mask (it cannot edit part of an image)".into());
        }
        match (&self.sizes, &request.size) {
            (Sizes::Any, _) | (_, Size::Auto) => {}
            (
                Sizes::Pixels {
                    max_side,
                    multiple_of,
                    max_pixels,
                },
                Size::Pixels { width, height },
            ) if width.max(height) <= max_side
                && width.min(height) >= multiple_of
                && width % multiple_of == 0
                && height % multiple_of == 0
                && u64::from(*width) * u64::from(*height) <= *max_pixels => {}
            (
                Sizes::Pixels {
                    max_side,
                    multiple_of,
                    max_pixels,
                },
                size,
            ) => {
                return Some(format!(
                    "takes sizes as WIDTHxHEIGHT, each side a multiple of {multiple_of} of at \
                     most {max_side}, {:.1} megapixels at most, or auto; not {size}",
                    *max_pixels as f64 / 1_048_576.0
                ));
            }
            (Sizes::Aspects(ratios), Size::Aspect { .. })
                if ratios.contains(&request.size.to_string().as_str()) => {}
            (Sizes::Aspects(ratios), size) => {
                return Some(format!(
                    "takes sizes as one of the aspect ratios {} or auto, not {size}",
                    ratios.join(", ")
                ));
            }
            (Sizes::AspectTiers { ratios, tiers }, size) => {
                if let Err(why) = aspect_tier(ratios, tiers, size) {
                    return Some(why);
                }
            }
        }
        if let (Some(formats), Some(format)) = (self.formats, &request.output_format)
            && !formats.contains(&format.as_str())
        {
            return Some(format!("makes {} images, not {format}", formats.join(", ")));
        }
        if request.seed.is_some() && !self.seed {
            return Some("takes no seed".into());
        }
        if request.negative_prompt.is_some() && !self.negative_prompt {
            return Some("takes no negative_prompt".into());
        }
        if request.background.as_deref() == Some("transparent") && !self.transparency {
            return Some("cannot make a transparent background".into());
        }
        None
    }

    /// The first of the request's `params` that neither the provider nor `also` (its
    /// configured `params_allowed`) takes, with the message that says what it takes.
    pub fn params_refusal(&self, request: &ImageRequest, also: &[String]) -> Option<String> {
        let key = request.params.keys().find(|k| {
            !self.params.contains(&k.as_str()) && !also.iter().any(|a| a == k.as_str())
        })?;
        let mut taken: Vec<&str> = self.params.to_vec();
        taken.extend(also.iter().map(String::as_str));
        let taken = if taken.is_empty() {
            "none".to_string()
        } else {
            taken.join(", ")
        };
        Some(format!(
            "takes no `params.{}` (it takes: {taken}; params_allowed in its config adds more)",
            key.escape_debug().take(64).collect::<String>()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_as_pixels_ratios_auto_or_open_strings() {
        assert_eq!(
            Size::parse("1024x1536"),
            Size::Pixels {
                width: 1024,
                height: 1536
            }
        );
        assert_eq!(
            Size::parse("16:9"),
            Size::Aspect {
                width: 16,
                height: 9
            }
        );
        assert_eq!(Size::parse("auto"), Size::Auto);
        for open in ["big", "0x5", "x5", "1024 x 1024", "-1x2", "4K"] {
            assert_eq!(Size::parse(open), Size::Named(open.into()), "{open}");
            assert_eq!(Size::parse(open).to_string(), open);
        }
        assert_eq!(Size::parse("512x256").to_string(), "512x256");
        assert_eq!(Size::parse("21:9").to_string(), "21:9");
    }

    fn request() -> ImageRequest {
        ImageRequest {
            model: "m".into(),
            prompt: "p".into(),
            negative_prompt: None,
            size: Size::parse("1024x1024"),
            count: 1,
            output_format: Some("png".into()),
            quality: None,
            background: None,
            seed: None,
            reference_count: 0,
            masked: false,
            refs: Default::default(),
            params: Map::new(),
        }
    }

    #[test]
    fn a_request_beyond_the_capabilities_is_refused_saying_what_is_accepted() {
        let caps = Capabilities {
            images_per_call: 1,
            sizes: Sizes::Aspects(&["1:1", "16:9"]),
            formats: Some(&["png", "jpeg"]),
            seed: true,
            negative_prompt: false,
            transparency: false,
            mode: Mode::SubmitAndPoll,
            references: 0,
            mask: false,
            params: &["user"],
        };
        let with = |f: &dyn Fn(&mut ImageRequest)| {
            let mut r = request();
            f(&mut r);
            caps.refusal(&r)
        };
        let size = with(&|_| {}).unwrap();
        assert!(
            size.contains("1:1, 16:9") && size.contains("1024x1024"),
            "{size}"
        );
        assert_eq!(with(&|r| r.size = Size::parse("16:9")), None);
        assert_eq!(with(&|r| r.size = Size::Auto), None);
        let r = |f: &dyn Fn(&mut ImageRequest)| {
            with(&|r: &mut ImageRequest| {
                r.size = Size::Auto;
                f(r)
            })
        };
        assert!(
            r(&|r| r.output_format = Some("webp".into()))
                .unwrap()
                .contains("png, jpeg")
        );
        assert_eq!(r(&|r| r.seed = Some(7)), None);
        assert!(
            r(&|r| r.negative_prompt = Some("x".into()))
                .unwrap()
                .contains("negative_prompt")
        );
        assert!(
            r(&|r| r.background = Some("transparent".into()))
                .unwrap()
                .contains("transparent")
        );
        assert_eq!(r(&|r| r.background = Some("opaque".into())), None);
        let pixels = Capabilities {
            sizes: Sizes::Pixels {
                max_side: 2048,
                multiple_of: 16,
                max_pixels: 2048 * 1024,
            },
            ..caps.clone()
        };
        let mut big = request();
        big.size = Size::parse("4096x1024");
        assert!(pixels.refusal(&big).unwrap().contains("at most 2048"));
        big.size = Size::parse("2048x1024");
        assert_eq!(pixels.refusal(&big), None);
        for size in ["2048x2048", "1000x1000", "8x8"] {
            big.size = Size::parse(size);
            let why = pixels.refusal(&big).expect(size);
            assert!(
                why.contains("multiple of 16") && why.contains("2.0 megapixels"),
                "{why}"
            );
        }
    }

    #[test]
    fn params_are_an_allow_list_per_provider_extended_by_config() {
        let caps = Capabilities {
            images_per_call: 1,
            sizes: Sizes::Any,
            formats: None,
            seed: false,
            negative_prompt: false,
            transparency: false,
            mode: Mode::Synchronous,
            references: 0,
            mask: false,
            params: &["user", "moderation"],
        };
        let with = |params: Value, also: &[String]| {
            let mut r = request();
            r.params = params.as_object().unwrap().clone();
            caps.params_refusal(&r, also)
        };
        assert_eq!(
            with(serde_json::json!({"user": "u", "moderation": "low"}), &[]),
            None
        );
        // Near misses of a worker-controlled field are not passed through.
        for near in ["N", "n ", "Model", "size\u{0}"] {
            let why = with(serde_json::json!({ near: 10 }), &[]).expect(near);
            assert!(why.contains("user, moderation"), "{why}");
        }
        let why = with(serde_json::json!({"steps": 4}), &[]).unwrap();
        assert!(why.contains("`params.steps`"), "{why}");
        assert_eq!(
            with(serde_json::json!({"steps": 4}), &["steps".to_string()]),
            None
        );
    }

    #[test]
    fn a_jobs_fields_win_over_the_providers_defaults() {
        let rules = crate::domain::job::JobRules {
            max_message_bytes: 4096,
            max_prompt_chars: 100,
            max_metadata_bytes: 100,
            providers: vec![],
        };
        let job = Job::parse(
            br#"{"id":"a","prompt":"p","size":"16:9","quality":"high","seed":3,"params":{"user":"u"}}"#,
            None,
            &rules,
        )
        .unwrap();
        let defaults = JobDefaults {
            model: "m1".into(),
            size: "1024x1024".into(),
            quality: Some("auto".into()),
            output_format: Some("png".into()),
            background: None,
        };
        let r = ImageRequest::for_job(&job, &defaults, 2);
        assert_eq!(r.model, "m1");
        assert_eq!(
            r.size,
            Size::Aspect {
                width: 16,
                height: 9
            }
        );
        assert_eq!(r.quality.as_deref(), Some("high"));
        assert_eq!(r.output_format.as_deref(), Some("png"));
        assert_eq!(r.background, None);
        assert_eq!(r.seed, Some(3));
        assert_eq!(r.count, 2);
        assert_eq!(r.params["user"], "u");
    }
}
