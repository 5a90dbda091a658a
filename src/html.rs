//! Self-contained HTML pages (reports of runs and comparisons): one file, inline CSS and
//! script, no network, no external fonts. Tables with class `sortable` sort by a click on a
//! header; a `completions-data` JSON block becomes a filterable completions browser.
//! Same inputs, same bytes.

use std::fmt::Write as _;

/// Escapes text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// A JSON value inside a `<script type="application/json">` block: `<` is written as
/// `\u003c`, so no `</script>` or `<!--` in the data can end the block.
pub fn json_script(id: &str, v: &serde_json::Value) -> String {
    let text = v.to_string().replace('<', "\\u003c");
    format!(
        r#"<script type="application/json" id="{}">{text}</script>"#,
        esc(id)
    )
}

/// A table; cells are escaped text, or raw HTML when they start with `\u{1}`.
pub fn table(id: &str, class: &str, head: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = format!(
        r#"<table id="{}" class="{}"><thead><tr>"#,
        esc(id),
        esc(class)
    );
    for h in head {
        let _ = write!(s, "<th>{}</th>", esc(h));
    }
    s.push_str("</tr></thead><tbody>");
    for r in rows {
        s.push_str("<tr>");
        for c in r {
            match c.strip_prefix('\u{1}') {
                Some(raw) => {
                    let _ = write!(s, "<td>{raw}</td>");
                }
                None => {
                    let _ = write!(s, "<td>{}</td>", esc(c));
                }
            }
        }
        s.push_str("</tr>");
    }
    s.push_str("</tbody></table>");
    s
}

/// Marks a table cell as raw HTML (see [`table`]).
pub fn raw(html: impl AsRef<str>) -> String {
    format!("\u{1}{}", html.as_ref())
}

/// A whole page: `banner` (if any) is shown at the top in a warning box.
pub fn page(title: &str, banner: Option<&str>, body: &str) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{}</title><style>{CSS}</style></head><body>",
        esc(title)
    );
    if let Some(b) = banner {
        let _ = write!(s, r#"<div class="banner" id="banner">{}</div>"#, esc(b));
    }
    s.push_str(body);
    let _ = writeln!(s, "<script>{JS}</script></body></html>");
    s
}

const CSS: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0 auto;max-width:1180px;padding:12px 20px;color:#222}\
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}\
.banner{background:#fff3cd;border:1px solid #e0c36a;padding:8px 12px;border-radius:4px;margin:8px 0}\
table{border-collapse:collapse;font-size:13px;margin:8px 0}th,td{border:1px solid #ddd;padding:3px 6px;vertical-align:top;text-align:left}\
th{background:#f4f4f4}table.sortable th{cursor:pointer;user-select:none}table.sortable th:after{content:' \\2195';color:#aaa}\
.v-reproduced{background:#d4edda;font-weight:600}.v-not-reproduced{background:#f8d7da;font-weight:600}.v-inconclusive{background:#fff3cd;font-weight:600}\
.plots svg{max-width:100%;height:auto;border:1px solid #eee;margin:6px 0}\
.filters{display:flex;flex-wrap:wrap;gap:8px;align-items:center;margin:8px 0}.filters select,.filters input{font-size:13px;padding:2px}\
td.text{white-space:pre-wrap;max-width:620px;font-family:ui-monospace,monospace;font-size:12px}\
.muted{color:#666;font-size:12px}code{font-size:12px}";

const JS: &str = r#"
(function(){
  function cellValue(td){var t=td.textContent.trim();var n=parseFloat(t.replace('%',''));return (t!==''&&!isNaN(n)&&/^[-+]?[0-9.]/.test(t))?n:t.toLowerCase();}
  document.querySelectorAll('table.sortable').forEach(function(tbl){
    tbl.querySelectorAll('th').forEach(function(th,i){
      th.addEventListener('click',function(){
        var body=tbl.tBodies[0];var rows=Array.prototype.slice.call(body.rows);
        var asc=th.getAttribute('data-dir')!=='asc';
        tbl.querySelectorAll('th').forEach(function(h){h.removeAttribute('data-dir');});
        th.setAttribute('data-dir',asc?'asc':'desc');
        rows.sort(function(a,b){var x=cellValue(a.cells[i]),y=cellValue(b.cells[i]);
          if(typeof x===typeof y){return (x<y?-1:x>y?1:0)*(asc?1:-1);}return (typeof x==='number'?-1:1)*(asc?1:-1);});
        rows.forEach(function(r){body.appendChild(r);});
      });
    });
  });
  var data=document.getElementById('completions-data');
  if(!data){return;}
  var d=JSON.parse(data.textContent);var cols=d.columns;var rows=d.rows;var LIMIT=d.limit||500;
  var ix={};cols.forEach(function(c,i){ix[c]=i;});
  function fill(sel,key){var seen={};var vals=[];rows.forEach(function(r){var v=r[ix[key]];if(!seen[v]){seen[v]=1;vals.push(v);}});
    vals.forEach(function(v){var o=document.createElement('option');o.value=v;o.textContent=v===''?'(none)':v;sel.appendChild(o);});}
  var fe=document.getElementById('f-experiment'),fc=document.getElementById('f-condition'),fl=document.getElementById('f-label'),fs=document.getElementById('f-search');
  fill(fe,'experiment');fill(fc,'condition');fill(fl,'label');
  var tbody=document.querySelector('#completions tbody');var shown=document.getElementById('shown');
  var show=d.show;
  function render(){
    var e=fe.value,c=fc.value,l=fl.value,q=fs.value.toLowerCase();var n=0;
    while(tbody.firstChild){tbody.removeChild(tbody.firstChild);}
    rows.forEach(function(r){
      if(e&&r[ix.experiment]!==e)return;if(c&&r[ix.condition]!==c)return;if(l&&r[ix.label]!==l)return;
      if(q&&r[ix.completion].toLowerCase().indexOf(q)<0&&r[ix.prompt_id].toLowerCase().indexOf(q)<0)return;
      n++;if(n>LIMIT)return;
      var tr=document.createElement('tr');tr.className='completion';tr.setAttribute('data-label',r[ix.label]);
      show.forEach(function(k){var td=document.createElement('td');td.textContent=r[ix[k]];if(k==='completion'){td.className='text';}tr.appendChild(td);});
      tbody.appendChild(tr);
    });
    shown.textContent=(n>LIMIT?('first '+LIMIT+' of '):'')+n+' of '+rows.length+' completions match';
  }
  [fe,fc,fl].forEach(function(x){x.addEventListener('change',render);});
  fs.addEventListener('input',render);
  render();
})();
"#;

/// The completions browser: filters, a count, and a table the script fills from `data`
/// (`{columns, rows, show, limit}`; rows are arrays of strings in `columns` order).
pub fn completions_browser(data: &serde_json::Value) -> String {
    let mut s = String::from(
        r#"<div class="filters"><label>experiment <select id="f-experiment"><option value="">all</option></select></label><label>condition <select id="f-condition"><option value="">all</option></select></label><label>label <select id="f-label"><option value="">all</option></select></label><label>search <input id="f-search" type="search" placeholder="text in completion or prompt id"></label><span id="shown" class="muted"></span></div>"#,
    );
    let show: Vec<String> = data["show"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    s.push_str(r#"<table id="completions"><thead><tr>"#);
    for h in &show {
        let _ = write!(s, "<th>{}</th>", esc(h));
    }
    s.push_str("</tr></thead><tbody></tbody></table>");
    s.push_str(&json_script("completions-data", data));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_cannot_close_its_script_block() {
        let v = serde_json::json!({"x": "</script><script>alert(1)</script><!--"});
        let s = json_script("d", &v);
        assert_eq!(s.matches("</script>").count(), 1);
        assert!(!s.contains("<!--"));
        let back: serde_json::Value = serde_json::from_str(
            s.trim_start_matches(r#"<script type="application/json" id="d">"#)
                .trim_end_matches("</script>"),
        )
        .unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn tables_escape_text_and_keep_raw_cells() {
        let t = table(
            "t",
            "sortable",
            &["a<b"],
            &[vec!["<i>x</i>".into()], vec![raw("<b>y</b>")]],
        );
        assert!(t.contains("a&lt;b") && t.contains("&lt;i&gt;x") && t.contains("<b>y</b>"));
        let p = page("T", Some("careful"), &t);
        assert!(p.starts_with("<!DOCTYPE html>") && p.contains("careful"));
        assert!(
            !p.contains("http://") && !p.contains("https://"),
            "no network"
        );
    }
}
