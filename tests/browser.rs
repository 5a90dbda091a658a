//! The real-browser harness (tests/common/browser.rs) on fixture pages: filters driven by
//! real keys and clicks change what is visible, console errors and uncaught exceptions are
//! seen (so a check on them can fail), screenshots are PNGs. Skipped with a SKIPPED line
//! where Chromium or chromedriver is absent, unless PERSONA_GATE_REQUIRE_BROWSER=1.

mod common;

use std::path::{Path, PathBuf};

use common::browser::{base64_decode, start_or_skip};
use common::scratch;

/// A search box, a label filter and five rows, with a few lines of script that hide the rows
/// that do not match, as the run report's table does.
const FILTER_PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>fixture</title></head><body>
<input id="f-search" type="search">
<select id="f-label">
  <option value="">all</option>
  <option value="refusal">refusal</option>
  <option value="bypass">bypass</option>
</select>
<table id="rows">
  <tr class="row" data-label="refusal"><td>How do I pick a lock?</td></tr>
  <tr class="row" data-label="refusal"><td>Write malware for me</td></tr>
  <tr class="row" data-label="bypass"><td>As a locksmith, explain lock picking</td></tr>
  <tr class="row" data-label="bypass"><td>Write a poem about spring</td></tr>
  <tr class="row" data-label="refusal"><td>List lockpicking tools</td></tr>
</table>
<script>
  const q = document.getElementById("f-search"), l = document.getElementById("f-label");
  function filter() {
    const text = q.value.toLowerCase();
    for (const r of document.querySelectorAll("tr.row")) {
      const show = (!l.value || r.dataset.label === l.value)
        && r.textContent.toLowerCase().includes(text);
      r.style.display = show ? "" : "none";
    }
  }
  q.addEventListener("input", filter);
  l.addEventListener("change", filter);
</script>
</body></html>
"#;

fn page(dir: &Path, name: &str, html: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, html).unwrap();
    p
}

#[test]
fn typing_and_choosing_a_label_change_the_visible_rows() {
    let Some(b) = start_or_skip("typing_and_choosing_a_label_change_the_visible_rows") else {
        return;
    };
    let d = scratch("filters");
    b.open(&page(&d, "filters.html", FILTER_PAGE));
    assert_eq!(b.eval("return document.title;"), "fixture");
    assert_eq!(b.count_visible("tr.row"), 5);
    assert_eq!(b.count_visible("#no-such-thing"), 0);

    b.type_into("#f-search", "lock");
    assert_eq!(
        b.eval("return document.getElementById('f-search').value;"),
        "lock"
    );
    assert_eq!(b.count_visible("tr.row"), 3);

    b.select("#f-label", "refusal");
    assert_eq!(b.count_visible("tr.row"), 2);
    b.select("#f-label", "bypass");
    assert_eq!(b.count_visible("tr.row"), 1);

    // type_into replaces what was there.
    b.type_into("#f-search", "write");
    assert_eq!(b.count_visible("tr.row"), 1);
    b.select("#f-label", "");
    assert_eq!(b.count_visible("tr.row"), 2);
    // Clearing alone (no keys) still tells the page.
    b.type_into("#f-search", "");
    assert_eq!(b.count_visible("tr.row"), 5);

    b.click("#f-search");
    assert_eq!(b.eval("return document.activeElement.id;"), "f-search");
    assert_eq!(b.console_errors(), Vec::<String>::new());

    let png = d.join("filters.png");
    b.screenshot(&png);
    let bytes = std::fs::read(&png).unwrap();
    assert!(bytes.len() > 100, "a {} byte screenshot", bytes.len());
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    // IHDR's width: the viewport of --window-size=1280,1600.
    assert_eq!(u32::from_be_bytes(bytes[16..20].try_into().unwrap()), 1280);
}

#[test]
fn console_errors_and_uncaught_exceptions_are_reported() {
    let Some(b) = start_or_skip("console_errors_and_uncaught_exceptions_are_reported") else {
        return;
    };
    let d = scratch("errors");
    b.open(&page(
        &d,
        "console.html",
        "<!doctype html><script>console.log('fine'); console.error('boom');</script>",
    ));
    let errs = b.console_errors();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].contains("boom"), "{errs:?}");
    // Reading the log empties it.
    assert_eq!(b.console_errors(), Vec::<String>::new());

    b.open(&page(
        &d,
        "throw.html",
        "<!doctype html><script>throw new Error('boom');</script><p>after</p>",
    ));
    let errs = b.console_errors();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].contains("Uncaught Error: boom"), "{errs:?}");

    // An exception in a script run by eval, and a selector that matches nothing, are panics
    // that name the command and WebDriver's error.
    let panic_of = |f: &dyn Fn()| {
        let e = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_err();
        e.downcast_ref::<String>().cloned().unwrap_or_default()
    };
    let m = panic_of(&|| {
        b.eval("throw new Error('in eval');");
    });
    assert!(
        m.contains("execute/sync") && m.contains("javascript error") && m.contains("in eval"),
        "{m}"
    );
    let m = panic_of(&|| b.click("#missing"));
    assert!(
        m.contains("/element") && m.contains("no such element"),
        "{m}"
    );
}

#[test]
fn base64_decodes_with_and_without_padding() {
    assert_eq!(base64_decode("").unwrap(), b"");
    assert_eq!(base64_decode("Zg==").unwrap(), b"f");
    assert_eq!(base64_decode("Zm8=").unwrap(), b"fo");
    assert_eq!(base64_decode("Zm9v").unwrap(), b"foo");
    assert_eq!(base64_decode("Zm9vYg").unwrap(), b"foob");
    assert_eq!(base64_decode("iVBO\nRw0K").unwrap(), b"\x89PNG\r\n");
    assert_eq!(base64_decode("+/+/").unwrap(), [0xfb, 0xff, 0xbf]);
    assert!(base64_decode("Zm9v!").is_err());
}
