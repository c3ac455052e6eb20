//! A one-line JSON object writer, without serde: the daemons' status and
//! the test tools' reports.

use std::fmt::Write;

/// A JSON object under construction. Keys appear in insertion order.
#[derive(Default)]
pub struct Json {
    buf: String,
}

impl Json {
    pub fn new() -> Self {
        Self::default()
    }

    fn key(&mut self, k: &str) -> &mut String {
        self.buf.push(if self.buf.is_empty() { '{' } else { ',' });
        escape(&mut self.buf, k);
        self.buf.push(':');
        &mut self.buf
    }

    pub fn str(&mut self, k: &str, v: &str) -> &mut Self {
        escape(self.key(k), v);
        self
    }

    pub fn u64(&mut self, k: &str, v: u64) -> &mut Self {
        let b = self.key(k);
        let _ = write!(b, "{v}");
        self
    }

    pub fn opt_u64(&mut self, k: &str, v: Option<u64>) -> &mut Self {
        match v {
            Some(v) => self.u64(k, v),
            None => self.null(k),
        }
    }

    /// A number with 3 decimals, or null.
    pub fn opt_f64(&mut self, k: &str, v: Option<f64>) -> &mut Self {
        match v {
            Some(v) => self.f64(k, v, 3),
            None => self.null(k),
        }
    }

    pub fn opt_str(&mut self, k: &str, v: Option<&str>) -> &mut Self {
        match v {
            Some(v) => self.str(k, v),
            None => self.null(k),
        }
    }

    /// A number with `decimals` digits after the point; `null` if not finite.
    pub fn f64(&mut self, k: &str, v: f64, decimals: usize) -> &mut Self {
        let b = self.key(k);
        if v.is_finite() {
            let _ = write!(b, "{v:.decimals$}");
        } else {
            b.push_str("null");
        }
        self
    }

    pub fn bool(&mut self, k: &str, v: bool) -> &mut Self {
        self.key(k).push_str(if v { "true" } else { "false" });
        self
    }

    pub fn null(&mut self, k: &str) -> &mut Self {
        self.key(k).push_str("null");
        self
    }

    pub fn obj(&mut self, k: &str, v: Json) -> &mut Self {
        let s = v.finish();
        self.key(k).push_str(&s);
        self
    }

    /// An array of already finished JSON values.
    pub fn raw_array(&mut self, k: &str, items: &[String]) -> &mut Self {
        let b = self.key(k);
        b.push('[');
        b.push_str(&items.join(","));
        b.push(']');
        self
    }

    pub fn strs(&mut self, k: &str, v: &[String]) -> &mut Self {
        let b = self.key(k);
        b.push('[');
        for (i, s) in v.iter().enumerate() {
            if i > 0 {
                b.push(',');
            }
            escape(b, s);
        }
        b.push(']');
        self
    }

    pub fn u64s(&mut self, k: &str, v: &[u64]) -> &mut Self {
        let b = self.key(k);
        b.push('[');
        for (i, n) in v.iter().enumerate() {
            if i > 0 {
                b.push(',');
            }
            let _ = write!(b, "{n}");
        }
        b.push(']');
        self
    }

    /// An object of counters.
    pub fn counts<'a>(&mut self, k: &str, v: impl IntoIterator<Item = (&'a String, &'a u64)>) -> &mut Self {
        let mut o = Json::new();
        for (name, n) in v {
            o.u64(name, *n);
        }
        self.obj(k, o)
    }

    pub fn finish(mut self) -> String {
        if self.buf.is_empty() {
            return "{}".to_string();
        }
        self.buf.push('}');
        self.buf
    }
}

fn escape(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}
