//! `imagegen gallery`, checked in a real headless browser (Debian's Chromium, driven through
//! chromedriver's WebDriver API): the page loads, shows every thumbnail, pages and filters, and
//! logs no console error.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use imagegen_fakes::openai::{Fault, Rule};
use serde_json::{Value, json};

use crate::helpers::{Store, TestEnv};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
}

impl Browser {
    async fn start() -> Self {
        assert!(
            std::path::Path::new(CHROMIUM).exists() && std::path::Path::new(CHROMEDRIVER).exists(),
            "Chromium and chromedriver are needed (scripts/services.sh installs them)"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while http.get(format!("{base}/status")).send().await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not answer");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--allow-file-access-from-files", "--window-size=1280,900"]
            },
            "goog:loggingPrefs": {"browser": "ALL"}
        }}});
        let created: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = created["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {created}"))
            .to_string();
        Self {
            driver,
            base,
            session,
            http,
        }
    }

    async fn call(&self, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}/{path}", self.base, self.session);
        let answer: Value = self
            .http
            .post(url)
            .json(&body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        answer["value"].clone()
    }

    async fn open(&self, url: &str) {
        self.call("url", json!({ "url": url })).await;
    }

    async fn run(&self, script: &str) -> Value {
        self.call("execute/sync", json!({ "script": script, "args": [] }))
            .await
    }

    /// Waits until every image of the page has loaded (or failed); returns
    /// (images, images loaded with pixels).
    async fn images(&self) -> (u64, u64) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let v = self
                .run("const i=[...document.images]; return [i.length, i.filter(x=>x.complete).length, i.filter(x=>x.complete&&x.naturalWidth>0).length];")
                .await;
            let (all, complete, ok) = (
                v[0].as_u64().unwrap(),
                v[1].as_u64().unwrap(),
                v[2].as_u64().unwrap(),
            );
            if complete == all || Instant::now() > deadline {
                return (all, ok);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn console_errors(&self) -> Vec<String> {
        let logs = self.call("se/log", json!({ "type": "browser" })).await;
        logs.as_array()
            .unwrap_or_else(|| panic!("no browser log: {logs}"))
            .iter()
            .filter(|l| l["level"] == "SEVERE")
            .map(|l| l["message"].to_string())
            .collect()
    }

    async fn close(mut self) {
        let _ = self
            .http
            .delete(format!("{}/session/{}", self.base, self.session))
            .send()
            .await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[tokio::test]
async fn the_gallery_of_a_batch_works_in_a_real_browser() {
    let env = TestEnv::new(Store::S3).await;
    env.fake().push_rule(Rule {
        prompt_contains: Some("refused".into()),
        fault: Fault::Moderation,
        times: None,
    });
    let dir = env.enqueue_prompts(
        "shown",
        &[
            "a <b>bold</b> fox",
            "a refused scene",
            "a quiet lake",
            "a red barn",
            "a tall tower",
        ],
    );
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.events(&mut listener, 5, Duration::from_secs(60)).await;
    worker.shutdown().await.unwrap();

    let out = dir.path().join("gallery");
    let made = env
        .command()
        .args(["gallery", "--batch", "shown", "--page-size", "3", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&made.stderr);
    assert!(made.status.success(), "{stderr}");
    assert!(stderr.contains("4 succeeded, 1 failed"), "{stderr}");
    assert_eq!(std::fs::read_dir(out.join("thumbs")).unwrap().count(), 4);

    let browser = Browser::start().await;
    let page = format!("file://{}", out.join("index.html").display());
    browser.open(&page).await;
    let title = browser.run("return document.title").await;
    assert_eq!(title, "shown · imagegen");
    // Page 1 of 2: three cards, every thumbnail shown.
    assert_eq!(
        browser
            .run("return document.querySelectorAll('.card').length")
            .await,
        3
    );
    let (all, ok) = browser.images().await;
    assert!(all >= 2 && ok == all, "{ok} of {all} images shown");
    // The prompt is text, not markup.
    let text = browser.run("return document.body.innerText").await;
    assert!(
        text.as_str().unwrap().contains("a <b>bold</b> fox"),
        "{text}"
    );
    // Full images are presigned links that work.
    let link = browser
        .run("return document.querySelector('.thumbs a').href")
        .await;
    let link = link.as_str().unwrap();
    assert!(link.contains("X-Amz-Signature"), "{link}");
    let full = reqwest::get(link).await.unwrap();
    assert_eq!(full.status(), 200);
    assert!(full.bytes().await.unwrap().starts_with(b"\x89PNG"));
    // Next page: the rest, every thumbnail shown.
    browser.run("document.getElementById('next').click()").await;
    assert_eq!(
        browser
            .run("return document.querySelectorAll('.card').length")
            .await,
        2
    );
    let (all, ok) = browser.images().await;
    assert_eq!(ok, all);
    // The failed filter: the refused job and its reason.
    browser
        .run("document.querySelector('[data-filter=failed]').click()")
        .await;
    assert_eq!(
        browser
            .run("return document.querySelectorAll('.card').length")
            .await,
        1
    );
    let error = browser
        .run("return document.querySelector('.card .error').textContent")
        .await;
    assert!(
        error.as_str().unwrap().starts_with("content_policy"),
        "{error}"
    );
    let errors = browser.console_errors().await;
    assert!(errors.is_empty(), "console errors: {errors:?}");

    // --download: a page that works without the store, with the full images beside it.
    let offline = dir.path().join("offline");
    let made = env
        .command()
        .args(["gallery", "--batch", "shown", "--download", "--out"])
        .arg(&offline)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    assert_eq!(
        std::fs::read_dir(offline.join("images")).unwrap().count(),
        4
    );
    browser
        .open(&format!("file://{}", offline.join("index.html").display()))
        .await;
    let (all, ok) = browser.images().await;
    assert!(all == 4 && ok == 4, "{ok} of {all}");
    let hrefs = browser
        .run("return [...document.querySelectorAll('.thumbs a')].map(a => a.getAttribute('href'))")
        .await;
    assert!(
        hrefs
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h.as_str().unwrap().starts_with("images/")),
        "{hrefs}"
    );
    let errors = browser.console_errors().await;
    assert!(errors.is_empty(), "console errors: {errors:?}");
    browser.close().await;
    env.cleanup().await;
}
