//! What self-hosted servers answer: ComfyUI's history entries, jobs, queue, queue length and
//! refusals, AUTOMATIC1111's txt2img answers and errors, and a workflow with its substitution
//! points, read from anything: a value or a classified failure, never a panic. A refused graph
//! (400) is permanent; a history or job that reads says where the prompt is; a txt2img answer that
//! reads holds at least one image, and one that does not is billed (its run was spent).
#![no_main]

use imagegen_core::automatic1111;
use imagegen_core::comfyui::workflow::{Points, Values, Workflow};
use imagegen_core::comfyui::{
    PromptState, execution_failure, queue_place, queue_remaining, read_history, read_job,
    submit_failure,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let id = "0b5c1f3e-8a2d-4c6f-9e1a-2b3c4d5e6f70";
    match first % 8 {
        0 => {
            if let Ok(PromptState::Failed(e)) = read_history(rest, id, None) {
                let f = execution_failure(&e, id);
                assert!(f.detail().charged, "a run that failed ran");
            }
        }
        1 => {
            let _ = read_job(rest, Some("9"));
        }
        2 => {
            let _ = queue_place(rest, id);
        }
        3 => {
            let _ = queue_remaining(rest);
        }
        4 => {
            let f = submit_failure(400, rest);
            assert!(!f.is_retryable(), "a refused graph is permanent");
            assert!(!f.message().is_empty());
        }
        5 => match automatic1111::read_answer(rest) {
            Ok(g) => assert!(!g.images.is_empty()),
            Err(f) => assert!(f.possibly_billed(), "the run was spent: {f}"),
        },
        6 => {
            let status = 400 + u16::from(first / 8) % 200;
            assert!(!automatic1111::classify(status, rest).message().is_empty());
        }
        _ => {
            let Ok(text) = std::str::from_utf8(rest) else {
                return;
            };
            let points = Points {
                prompt: "6.text".into(),
                seed: "3.seed".into(),
                width: "5.width".into(),
                height: "5.height".into(),
                count: "5.batch_size".into(),
                model: "4.ckpt_name".into(),
                ..Points::default()
            };
            if let Ok(w) = Workflow::parse(text, &points, "") {
                let graph = w.fill(&Values {
                    prompt: "p",
                    seed: 1,
                    size: Some((64, 64)),
                    count: 2,
                    model: Some("m"),
                    ..Values::default()
                });
                assert_eq!(graph["6"]["inputs"]["text"], "p");
            }
        }
    }
});
