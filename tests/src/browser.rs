//! A real headless browser for the web console tests: Debian's `chromium` driven by its
//! `chromedriver` over the W3C WebDriver protocol (JSON over HTTP on loopback). The few
//! commands the tests need (navigate, run a script, click, screenshot) are a page of
//! code here, so the harness needs no WebDriver crate and its dependencies.
//!
//! TLS trust is pinned, not switched off: chromium accepts exactly the public keys the
//! test names (`--ignore-certificate-errors-spki-list`, the SHA-256 of each node
//! certificate's SubjectPublicKeyInfo), so any other certificate is still an error.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use serde_json::{json, Value};

use crate::wait::Wait;

/// Where Debian's packages put the browser and its driver (`deploy/setup.sh` installs
/// `chromium` and `chromium-driver`).
pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How often [`Browser::click`] looks an element up again after the page replaced it.
pub const STALE_RETRIES: usize = 20;

/// One chromedriver process and one browser session; both end on drop.
pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    _profile: tempfile::TempDir,
}

/// The `--ignore-certificate-errors-spki-list` entry for the certificate in `cert_pem`:
/// base64 of the SHA-256 of its SubjectPublicKeyInfo.
pub fn spki_pin(cert_pem: &Path) -> String {
    let text = std::fs::read_to_string(cert_pem)
        .unwrap_or_else(|e| panic!("read {}: {e}", cert_pem.display()));
    let pem = pem::parse(text.as_bytes())
        .unwrap_or_else(|e| panic!("{} is not PEM: {e}", cert_pem.display()));
    let (_, cert) = x509_parser::parse_x509_certificate(pem.contents())
        .unwrap_or_else(|e| panic!("{} is not a certificate: {e}", cert_pem.display()));
    let hex = cluster_proto::pki::sha256_hex(cert.tbs_certificate.subject_pki.raw);
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .filter_map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect chromedriver: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| format!("write to chromedriver: {e}"))?;
    // chromedriver keeps the connection open after its answer: read the head, then
    // exactly Content-Length bytes.
    let mut resp = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let (head, body) = loop {
        let n = s
            .read(&mut buf)
            .map_err(|e| format!("read from chromedriver: {e}"))?;
        if n == 0 {
            return Err(format!(
                "chromedriver closed the connection: {:?}",
                String::from_utf8_lossy(&resp)
            ));
        }
        resp.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&resp).into_owned();
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            continue;
        };
        let len = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            })
            .ok_or_else(|| format!("no Content-Length in {head:?}"))?;
        if body.len() >= len {
            break (head.to_owned(), body.to_owned());
        }
    };
    let v: Value = serde_json::from_str(&body)
        .map_err(|e| format!("chromedriver answered {head:?} {body:?}: {e}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("{method} {path}: {head}: {v}"));
    }
    Ok(v["value"].clone())
}

impl Browser {
    /// Starts chromedriver and a headless chromium that trusts the certificates whose
    /// SPKI pins are `pins` (see [`spki_pin`]).
    pub fn start(pins: &[String]) -> Browser {
        for bin in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(bin).exists(),
                "{bin} is missing: apt-get install chromium chromium-driver (deploy/setup.sh)"
            );
        }
        let addr = crate::free_port([127, 0, 0, 1]).unwrap_or_else(|e| panic!("{e}"));
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={}", addr.port()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {CHROMEDRIVER}: {e}"));
        let profile = tempfile::Builder::new()
            .prefix("console-browser-")
            .tempdir()
            .unwrap_or_else(|e| panic!("browser profile dir: {e}"));
        let mut b = Browser {
            driver,
            addr,
            session: String::new(),
            _profile: profile,
        };
        let ready = Wait::new(Duration::from_secs(30)).until_blocking(
            "chromedriver ready",
            || http(addr, "GET", "/status", None),
            |v| v["ready"] == json!(true),
        );
        if let Err(e) = ready {
            panic!("{e}");
        }
        let args = vec![
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--window-size=1400,900".into(),
            format!("--user-data-dir={}", b._profile.path().display()),
            format!("--ignore-certificate-errors-spki-list={}", pins.join(",")),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": false,
            "goog:chromeOptions": {"binary": CHROMIUM, "args": args},
        }}});
        let v = http(addr, "POST", "/session", Some(&caps))
            .unwrap_or_else(|e| panic!("new browser session: {e}"));
        b.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id in {v}"))
            .to_owned();
        b
    }

    fn cmd(&self, method: &str, what: &str, body: Option<Value>) -> Result<Value, String> {
        let path = format!("/session/{}{what}", self.session);
        http(self.addr, method, &path, body.as_ref())
    }

    /// Navigates to `url` (returns once the page loaded).
    pub fn goto(&self, url: &str) {
        if let Err(e) = self.cmd("POST", "/url", Some(json!({ "url": url }))) {
            panic!("open {url}: {e}");
        }
    }

    /// Runs `js` (a function body; `return` gives the value) in the page.
    pub fn script(&self, js: &str) -> Result<Value, String> {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(json!({ "script": js, "args": [] })),
        )
    }

    /// Runs `js`, which calls `done(value)` (the last argument) when finished, e.g. after
    /// a `fetch`.
    pub fn script_async(&self, js: &str) -> Result<Value, String> {
        let body = format!("const done = arguments[arguments.length - 1];\n{js}");
        self.cmd(
            "POST",
            "/execute/async",
            Some(json!({ "script": body, "args": [] })),
        )
    }

    /// Clicks the element `css` selects (as a user would: it must be visible). A page
    /// that re-renders replaces elements between finding and clicking one ("stale
    /// element reference"): then it is found again, up to [`STALE_RETRIES`] times.
    pub fn click(&self, css: &str) -> Result<(), String> {
        let mut tries = 0;
        loop {
            match self.click_once(css) {
                Err(e) if e.contains("stale element reference") && tries < STALE_RETRIES => {
                    tries += 1;
                }
                r => return r,
            }
        }
    }

    fn click_once(&self, css: &str) -> Result<(), String> {
        let found = self.cmd(
            "POST",
            "/element",
            Some(json!({ "using": "css selector", "value": css })),
        )?;
        let id = found
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .ok_or_else(|| format!("no element id in {found}"))?
            .to_owned();
        self.cmd("POST", &format!("/element/{id}/click"), Some(json!({})))
            .map(|_| ())
    }

    /// Saves a PNG of the window to `path`.
    pub fn screenshot(&self, path: &Path) {
        let v = self
            .cmd("GET", "/screenshot", None)
            .unwrap_or_else(|e| panic!("screenshot: {e}"));
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or(""))
            .unwrap_or_else(|e| panic!("screenshot is not base64: {e}"));
        assert!(
            png.starts_with(b"\x89PNG\r\n\x1a\n"),
            "the screenshot is not a PNG"
        );
        std::fs::write(path, png).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.cmd("DELETE", "", None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Where the console tests save their screenshots: `$CONSOLE_SCREENSHOTS_DIR` when set
/// (relative to the workspace root: `CONSOLE_SCREENSHOTS_DIR=docs` refreshes the ones
/// kept in `docs/`), else `fallback` (a test directory), so a test run changes no file of
/// the repository.
pub fn screenshot_dir(fallback: &Path) -> PathBuf {
    match std::env::var_os("CONSOLE_SCREENSHOTS_DIR") {
        Some(d) => Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(d),
        None => fallback.to_path_buf(),
    }
}
