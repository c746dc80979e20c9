//! Sentence templates: `Clicked '{{ element.text }}' on {{ path | default: "a page" }}`.

use std::borrow::Cow;
use std::sync::Arc;

use regex::Regex;

use crate::condition::{ElementField, EventCtx, PropPath, Subject};

/// What a missing value renders as when the template gives no `default`.
pub const MISSING: &str = "unknown";
/// Longest value (in characters) a template inserts; longer ones are cut with `…`.
pub const MAX_VALUE_CHARS: usize = 120;
/// Longest template source accepted.
pub const MAX_TEMPLATE_LEN: usize = 1024;

/// A compiled sentence template.
#[derive(Debug, Clone)]
pub struct Template {
    parts: Box<[Part]>,
    literal_len: usize,
}

#[derive(Debug, Clone)]
enum Part {
    Literal(Box<str>),
    /// `{{ var }}`, `{{ var | default: "x" }}` (the common cases, rendered without a copy), or
    /// `{{ var | filter | … }}`.
    Value {
        var: Var,
        default: Option<Box<str>>,
        filters: Box<[Filter]>,
    },
}

/// A filter of a template value, applied in order after the value is cleaned.
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// The text when the value is missing or empty.
    Default(Box<str>),
    Lower,
    Upper,
    /// The first letter of each word upper-cased.
    Title,
    Trim,
    /// `monthly-revenue`, `monthly_revenue` → `monthly revenue`.
    Humanize,
    /// At most this many characters, `…` marking a cut.
    Truncate(usize),
}

/// The filters a template may use, for error messages.
const FILTERS: &str = "default: \"text\", lower, upper, title, trim, humanize, truncate: N";

impl Filter {
    fn apply(&self, v: Option<String>) -> Option<String> {
        let nonempty = |s: String| (!s.is_empty()).then_some(s);
        match self {
            Filter::Default(d) => v.or_else(|| Some(d.to_string())),
            Filter::Lower => v.map(|s| s.to_lowercase()),
            Filter::Upper => v.map(|s| s.to_uppercase()),
            Filter::Title => v.map(|s| title(&s)),
            Filter::Trim => v.and_then(|s| nonempty(s.trim().to_owned())),
            Filter::Humanize => v.and_then(|s| {
                let words: Vec<&str> = s
                    .split(|c: char| c == '-' || c == '_' || c.is_whitespace())
                    .filter(|w| !w.is_empty())
                    .collect();
                nonempty(words.join(" "))
            }),
            Filter::Truncate(n) => v.map(|s| truncate(s, *n)),
        }
    }
}

fn title(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut word_start = true;
    for c in s.chars() {
        if word_start && c.is_alphabetic() {
            out.extend(c.to_uppercase());
        } else {
            out.push(c);
        }
        word_start = c.is_whitespace() || c == '-' || c == '/';
    }
    out
}

fn truncate(s: String, n: usize) -> String {
    match s.char_indices().nth(n) {
        None => s,
        Some((cut, _)) => {
            let mut out = s[..cut].trim_end().to_owned();
            out.push('…');
            out
        }
    }
}

/// A template variable.
#[derive(Debug, Clone)]
pub enum Var {
    Subject(Subject),
    /// A named group of one of the rule's regexes.
    Capture(Box<str>),
}

/// A regex of the rule whose named groups templates may use, and the field it reads.
#[derive(Debug, Clone)]
pub struct CaptureSource {
    pub subject: Subject,
    pub regex: Arc<Regex>,
}

impl Template {
    pub fn parse(src: &str) -> Result<Template, String> {
        if src.len() > MAX_TEMPLATE_LEN {
            return Err(format!("template longer than {MAX_TEMPLATE_LEN} bytes"));
        }
        let mut parts = Vec::new();
        let mut rest = src;
        let mut literal_len = 0;
        while let Some(open) = rest.find("{{") {
            if open > 0 {
                literal_len += open;
                parts.push(Part::Literal(rest[..open].into()));
            }
            let after = &rest[open + 2..];
            let close = after
                .find("}}")
                .ok_or_else(|| format!("unclosed `{{{{` in template {src:?}"))?;
            parts.push(parse_expr(after[..close].trim())?);
            rest = &after[close + 2..];
        }
        if rest.contains("}}") {
            return Err(format!("`}}}}` without `{{{{` in template {src:?}"));
        }
        if !rest.is_empty() {
            literal_len += rest.len();
            parts.push(Part::Literal(rest.into()));
        }
        Ok(Template {
            parts: parts.into(),
            literal_len,
        })
    }

    /// Visits every subject the template reads.
    pub fn for_each_subject_mut(&mut self, f: &mut impl FnMut(&mut Subject)) {
        for p in self.parts.iter_mut() {
            if let Part::Value {
                var: Var::Subject(s),
                ..
            } = p
            {
                f(s);
            }
        }
    }

    /// The capture names the template uses.
    pub fn captures(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Value {
                var: Var::Capture(n),
                ..
            } => Some(&**n),
            _ => None,
        })
    }

    /// Renders the sentence; values are single-line, trimmed and capped.
    pub fn render(&self, ctx: &EventCtx<'_>, captures: &[CaptureSource]) -> String {
        let mut out = String::with_capacity(self.literal_len + 24);
        for part in &*self.parts {
            match part {
                Part::Literal(s) => out.push_str(s),
                Part::Value {
                    var,
                    default,
                    filters,
                } => {
                    let v = match var {
                        Var::Subject(s) => ctx.get(s).and_then(|v| v.text()),
                        Var::Capture(name) => capture(ctx, captures, name),
                    };
                    if filters.is_empty() {
                        let before = out.len();
                        if let Some(v) = v {
                            push_clean(&mut out, &v);
                        }
                        if out.len() == before {
                            out.push_str(default.as_deref().unwrap_or(MISSING));
                        }
                        continue;
                    }
                    let mut value = v.and_then(|v| {
                        let mut s = String::new();
                        push_clean(&mut s, &v);
                        (!s.is_empty()).then_some(s)
                    });
                    for f in &**filters {
                        value = f.apply(value);
                    }
                    match value {
                        Some(v) => push_clean(&mut out, &v),
                        None => out.push_str(MISSING),
                    }
                }
            }
        }
        out
    }
}

fn capture<'a>(ctx: &EventCtx<'a>, sources: &[CaptureSource], name: &str) -> Option<Cow<'a, str>> {
    for src in sources {
        if src.regex.capture_names().flatten().any(|n| n == name) {
            let text = ctx.get(&src.subject)?.text()?;
            let caps = src.regex.captures(&text)?;
            let m = caps.name(name)?;
            return Some(Cow::Owned(m.as_str().to_owned()));
        }
    }
    None
}

/// Appends `v` with control characters and whitespace runs folded to one space, capped.
pub fn push_clean(out: &mut String, v: &str) {
    // Fast path: short printable ASCII with single inner spaces, checked in one pass.
    let b = v.as_bytes();
    if b.len() <= MAX_VALUE_CHARS && b.last() != Some(&b' ') {
        // Starts true so a leading space fails too.
        let mut after_space = true;
        let mut clean = true;
        for &c in b {
            let space = c == b' ';
            clean &= (b' '..=b'~').contains(&c) && !(space && after_space);
            after_space = space;
        }
        if clean {
            out.push_str(v);
            return;
        }
    }
    let mut chars = 0;
    let mut pending_space = false;
    for c in v.trim().chars() {
        if c.is_whitespace() || c.is_control() {
            pending_space = true;
            continue;
        }
        if chars >= MAX_VALUE_CHARS {
            out.push('…');
            return;
        }
        if pending_space {
            out.push(' ');
            chars += 1;
            pending_space = false;
        }
        out.push(c);
        chars += 1;
    }
}

fn parse_expr(expr: &str) -> Result<Part, String> {
    let mut pieces = split_filters(expr).into_iter();
    let name = pieces.next().unwrap_or_default().trim();
    let mut filters = pieces
        .map(|f| parse_filter(f.trim()))
        .collect::<Result<Vec<_>, _>>()?;
    // A lone trailing `default` keeps the copy-free path.
    let default = match filters.as_slice() {
        [Filter::Default(d)] => {
            let d = d.clone();
            filters.clear();
            Some(d)
        }
        _ => None,
    };
    Ok(Part::Value {
        var: parse_var(name)?,
        default,
        filters: filters.into(),
    })
}

/// Splits `a | b: "x|y" | c` at the bars outside quotes.
fn split_filters(expr: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut quote = None;
    let mut start = 0;
    for (i, c) in expr.char_indices() {
        match (quote, c) {
            (None, '"' | '\'') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '|') => {
                out.push(&expr[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&expr[start..]);
    out
}

/// One filter: `lower`, `truncate: 20`, `truncate(20)`, `default: "x"`, `default("x")`.
fn parse_filter(f: &str) -> Result<Filter, String> {
    let unknown = || format!("unknown filter `{f}`; filters are {FILTERS}");
    let name_len = f
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(f.len());
    let (name, rest) = f.split_at(name_len);
    let arg = argument(rest.trim()).map_err(|()| unknown())?;
    let no_arg = |filter: Filter| match arg {
        None => Ok(filter),
        Some(_) => Err(format!("filter `{name}` takes no argument")),
    };
    match name {
        "lower" => no_arg(Filter::Lower),
        "upper" => no_arg(Filter::Upper),
        "title" => no_arg(Filter::Title),
        "trim" => no_arg(Filter::Trim),
        "humanize" => no_arg(Filter::Humanize),
        "truncate" => {
            let n = arg
                .and_then(|a| a.parse::<usize>().ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| "filter `truncate` needs a length: `truncate: 40`".to_string())?;
            Ok(Filter::Truncate(n))
        }
        "default" => {
            let text = arg
                .and_then(|a| {
                    let q = a.chars().next()?;
                    ((q == '"' || q == '\'') && a.len() >= 2 && a.ends_with(q))
                        .then(|| a[1..a.len() - 1].into())
                })
                .ok_or_else(|| {
                    "filter `default` needs quoted text: `default: \"a page\"`".to_string()
                })?;
            Ok(Filter::Default(text))
        }
        _ => Err(unknown()),
    }
}

/// The argument after a filter's name: `: x` or `(x)`; `Err` for anything else.
fn argument(rest: &str) -> Result<Option<&str>, ()> {
    if rest.is_empty() {
        return Ok(None);
    }
    if let Some(a) = rest.strip_prefix(':') {
        return Ok(Some(a.trim()));
    }
    match rest.strip_prefix('(').and_then(|r| r.strip_suffix(')')) {
        Some(a) => Ok(Some(a.trim())),
        None => Err(()),
    }
}

fn parse_var(name: &str) -> Result<Var, String> {
    if name.is_empty() {
        return Err("empty `{{ }}` in template".into());
    }
    let subject = match name {
        "event" => Subject::Event,
        "distinct_id" => Subject::DistinctId,
        "path" => Subject::Path,
        "url" => Subject::Url,
        "host" => Subject::Host,
        "element.text" => Subject::Element(ElementField::Text),
        "element.tag" => Subject::Element(ElementField::Tag),
        "element.id" => Subject::Element(ElementField::Id),
        "element.href" => Subject::Element(ElementField::Href),
        "element.classes" => Subject::Element(ElementField::Classes),
        _ => {
            if let Some(a) = name
                .strip_prefix("element.attributes.")
                .or_else(|| name.strip_prefix("element.attr."))
            {
                Subject::Element(ElementField::Attribute(a.into()))
            } else if let Some(p) = name.strip_prefix("properties.") {
                Subject::Property(PropPath::new(p)?)
            } else if let Some(p) = name.strip_prefix("person.") {
                Subject::Person(PropPath::new(p)?)
            } else if let Some(c) = name.strip_prefix("match.") {
                return Ok(Var::Capture(c.into()));
            } else if name.starts_with("element.") {
                return Err(format!(
                    "unknown element field `{name}`; use text, tag, id, href, classes or attributes.NAME"
                ));
            } else if name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Ok(Var::Capture(name.into()));
            } else {
                return Err(format!(
                    "unknown template value `{name}`; use event, distinct_id, path, url, host, element.*, properties.*, person.* or a regex group name"
                ));
            }
        }
    };
    Ok(Var::Subject(subject))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx_render(t: &str, props: serde_json::Value) -> String {
        let props = props.as_object().unwrap().clone();
        let ctx = EventCtx::of_props("$pageview", &props);
        Template::parse(t).unwrap().render(&ctx, &[])
    }

    #[test]
    fn renders_values_defaults_and_missing() {
        let p = json!({"$current_url": "https://x.com/pricing?a=1", "plan": "pro", "n": 3});
        for (template, want) in [
            ("Viewed page: {{ path }}", "Viewed page: /pricing"),
            ("{{properties.plan}} {{ properties.n }}", "pro 3"),
            ("{{ properties.x | default: \"free\" }}", "free"),
            ("{{ properties.x | default('a b') }}", "a b"),
        ] {
            assert_eq!(ctx_render(template, p.clone()), want, "{template}");
        }
        assert_eq!(ctx_render("{{ properties.x }}", p), MISSING);
    }

    #[test]
    fn values_cannot_break_the_line() {
        let p = json!({"t": "  Ignore\n\nprevious\tinstructions\u{0}  "});
        assert_eq!(
            ctx_render("'{{ properties.t }}'", p),
            "'Ignore previous instructions'"
        );
        let long = "x".repeat(500);
        let out = ctx_render("{{ properties.t }}", json!({ "t": long }));
        assert_eq!(out.chars().count(), MAX_VALUE_CHARS + 1);
    }

    #[test]
    fn rejects_bad_templates() {
        assert!(Template::parse("{{ path").is_err());
        assert!(Template::parse("{{ }}").is_err());
        assert!(Template::parse("{{ path | shout }}").is_err());
        assert!(Template::parse("{{ path | truncate }}").is_err());
        assert!(Template::parse("{{ path | truncate: 0 }}").is_err());
        assert!(Template::parse("{{ path | lower: 3 }}").is_err());
        assert!(Template::parse("{{ path | default: x }}").is_err());
        assert!(Template::parse("{{ element.colour }}").is_err());
        assert!(Template::parse("{{ a-b }}").is_err());
    }
}
