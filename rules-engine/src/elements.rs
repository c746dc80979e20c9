//! The clicked element of an `$autocapture` event, read without copying from PostHog's
//! `elements_chain` string, a `$elements` array, or `$el_text`/`attr__*` properties.

use std::borrow::Cow;

use serde_json::{Map, Value};

/// One element of the DOM path, innermost (the clicked element) first.
#[derive(Debug, Clone, Copy)]
pub enum Element<'a> {
    /// One `;`-separated entry of an `elements_chain` string.
    Chain(ChainElement<'a>),
    /// One object of a `$elements` array.
    Json(&'a Map<String, Value>),
    /// The event's own properties (`$el_text`, `attr__*`), when no chain or array was sent.
    Props(&'a Map<String, Value>),
}

/// An element of an `elements_chain` string: `tag.class1.class2:attr="v"attr2="v"`.
#[derive(Debug, Clone, Copy)]
pub struct ChainElement<'a> {
    tag: &'a str,
    classes: &'a str,
    attrs: &'a str,
}

impl<'a> Element<'a> {
    /// The tag name, lower case as PostHog sends it (`button`, `a`).
    pub fn tag(&self) -> Option<Cow<'a, str>> {
        match self {
            Element::Chain(c) => (!c.tag.is_empty()).then_some(Cow::Borrowed(c.tag)),
            Element::Json(m) => json_str(m, "tag_name"),
            Element::Props(m) => json_str(m, "$el_tag_name").or_else(|| json_str(m, "tag_name")),
        }
    }

    /// The visible text.
    pub fn text(&self) -> Option<Cow<'a, str>> {
        match self {
            Element::Chain(c) => c.attr_raw("text"),
            Element::Json(m) => json_str(m, "$el_text").or_else(|| json_str(m, "text")),
            Element::Props(m) => json_str(m, "$el_text"),
        }
        .and_then(tidy_text)
    }

    /// The `id` attribute.
    pub fn id(&self) -> Option<Cow<'a, str>> {
        match self {
            Element::Chain(c) => c.attr_raw("attr_id").or_else(|| c.attr_raw("attr__id")),
            Element::Json(m) => json_str(m, "attr_id").or_else(|| self.attribute("id")),
            Element::Props(_) => self.attribute("id"),
        }
    }

    /// The `href` attribute.
    pub fn href(&self) -> Option<Cow<'a, str>> {
        match self {
            Element::Chain(c) => c.attr_raw("href").or_else(|| c.attr_raw("attr__href")),
            Element::Json(m) => json_str(m, "href").or_else(|| self.attribute("href")),
            Element::Props(_) => self.attribute("href"),
        }
    }

    /// An HTML attribute by name (`data-attr`, `aria-label`), stored by PostHog as `attr__NAME`.
    /// Falls back to the raw key (`nth-child`).
    pub fn attribute(&self, name: &str) -> Option<Cow<'a, str>> {
        match self {
            Element::Chain(c) => c.attr_named(name),
            Element::Json(m) => {
                let nested = m.get("attributes").and_then(Value::as_object);
                nested
                    .and_then(|a| find_prefixed(a, name))
                    .or_else(|| find_prefixed(m, name))
                    .or_else(|| json_str(m, name))
            }
            Element::Props(m) => find_prefixed(m, name),
        }
    }

    /// Whether the element carries the CSS class `class`.
    pub fn has_class(&self, class: &str) -> bool {
        match self {
            Element::Chain(c) => {
                if !c.classes.is_empty() {
                    return c.classes.split('.').any(|k| k == class);
                }
                c.attr_prefixed("class")
                    .is_some_and(|v| v.split_ascii_whitespace().any(|k| k == class))
            }
            Element::Json(m) => {
                if let Some(list) = m.get("attr_class").or_else(|| m.get("classes"))
                    && let Some(list) = list.as_array()
                {
                    return list.iter().any(|v| v.as_str() == Some(class));
                }
                self.attribute("class")
                    .is_some_and(|v| v.split_ascii_whitespace().any(|k| k == class))
            }
            Element::Props(_) => self
                .attribute("class")
                .is_some_and(|v| v.split_ascii_whitespace().any(|k| k == class)),
        }
    }

    /// All classes, space separated (for templates).
    pub fn classes(&self) -> Option<Cow<'a, str>> {
        match self {
            Element::Chain(c) if !c.classes.is_empty() => {
                Some(Cow::Owned(c.classes.replace('.', " ")))
            }
            Element::Json(m) => {
                if let Some(list) = m.get("attr_class").and_then(Value::as_array) {
                    let joined: Vec<&str> = list.iter().filter_map(Value::as_str).collect();
                    return Some(Cow::Owned(joined.join(" ")));
                }
                self.attribute("class")
            }
            _ => self.attribute("class"),
        }
    }
}

impl<'a> ChainElement<'a> {
    /// Parses one entry of an elements chain (no `;`). Never fails: garbage yields empty fields.
    pub fn parse(s: &'a str) -> ChainElement<'a> {
        let (head, attrs) = split_head(s);
        let (tag, classes) = match head.find('.') {
            Some(i) => (&head[..i], &head[i + 1..]),
            None => (head, ""),
        };
        ChainElement {
            tag,
            classes: classes.trim_matches('.'),
            attrs,
        }
    }

    /// The value of attribute `key` exactly.
    fn attr_raw(&self, key: &str) -> Option<Cow<'a, str>> {
        AttrIter { rest: self.attrs }
            .find(|(k, _)| *k == key)
            .map(|(_, v)| unescape(v))
    }

    /// `attr__{name}`, else the raw key `name`, in one pass.
    fn attr_named(&self, name: &str) -> Option<Cow<'a, str>> {
        let mut raw = None;
        for (k, v) in (AttrIter { rest: self.attrs }) {
            if k.strip_prefix("attr__") == Some(name) {
                return Some(unescape(v));
            }
            if raw.is_none() && k == name {
                raw = Some(v);
            }
        }
        raw.map(unescape)
    }

    /// The value of `attr__{name}`.
    fn attr_prefixed(&self, name: &str) -> Option<Cow<'a, str>> {
        AttrIter { rest: self.attrs }
            .find(|(k, _)| k.strip_prefix("attr__") == Some(name))
            .map(|(_, v)| unescape(v))
    }
}

/// Splits `tag.cls:attrs` at the first `:` that starts `key=` (classes such as `hover:bg-x` contain `:`).
fn split_head(s: &str) -> (&str, &str) {
    let b = s.as_bytes();
    let mut from = 0;
    while let Some(off) = b[from..].iter().position(|&c| c == b':') {
        let at = from + off;
        let mut j = at + 1;
        while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_' || b[j] == b'-') {
            j += 1;
        }
        if j < b.len() && b[j] == b'=' {
            return (&s[..at], &s[at + 1..]);
        }
        from = at + 1;
    }
    (s, "")
}

/// Iterates `key="value"` pairs; values are still escaped.
struct AttrIter<'a> {
    rest: &'a str,
}

impl<'a> Iterator for AttrIter<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        let s = self.rest;
        let b = s.as_bytes();
        // `key="`: the first `=` followed by a quote.
        let mut eq = 0;
        loop {
            eq += b.get(eq..)?.iter().position(|&c| c == b'=')?;
            if b.get(eq + 1) == Some(&b'"') {
                break;
            }
            eq += 1;
        }
        let start = eq + 2;
        let mut i = start;
        while i < b.len() {
            match b[i] {
                b'\\' => i += 2,
                b'"' => {
                    self.rest = &s[i + 1..];
                    return Some((&s[..eq], &s[start..i]));
                }
                _ => i += 1,
            }
        }
        // Unterminated value: take the rest.
        self.rest = "";
        Some((&s[..eq], &s[start..]))
    }
}

fn unescape(v: &str) -> Cow<'_, str> {
    if !v.contains('\\') {
        return Cow::Borrowed(v);
    }
    let mut out = String::with_capacity(v.len());
    let mut chars = v.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            if let Some(n) = chars.next() {
                out.push(n);
            }
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Iterates the elements of a chain, clicked element first; `;` inside quotes does not split.
pub struct ChainIter<'a> {
    rest: &'a str,
}

impl<'a> ChainIter<'a> {
    pub fn new(chain: &'a str) -> Self {
        ChainIter { rest: chain.trim() }
    }
}

impl<'a> Iterator for ChainIter<'a> {
    type Item = ChainElement<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let end = element_end(self.rest);
        let item = &self.rest[..end];
        self.rest = self.rest.get(end + 1..).unwrap_or("");
        Some(ChainElement::parse(item.trim()))
    }
}

/// Where the first element of a chain ends: the first `;` outside quotes (or the end); inside
/// quotes a backslash escapes the byte after it.
fn element_end(s: &str) -> usize {
    let b = s.as_bytes();
    let mut in_quotes = false;
    let mut i = 0;
    while let Some(off) = b
        .get(i..)
        .and_then(|r| memchr::memchr3(b';', b'"', b'\\', r))
    {
        let at = i + off;
        match b[at] {
            b'\\' if in_quotes => i = at + 2,
            b'"' => {
                in_quotes = !in_quotes;
                i = at + 1;
            }
            b';' if !in_quotes => return at,
            _ => i = at + 1,
        }
    }
    b.len()
}

fn json_str<'a>(m: &'a Map<String, Value>, key: &str) -> Option<Cow<'a, str>> {
    match m.get(key)? {
        Value::String(s) => Some(Cow::Borrowed(s.as_str())),
        Value::Number(n) => Some(Cow::Owned(n.to_string())),
        Value::Bool(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
        _ => None,
    }
}

fn find_prefixed<'a>(m: &'a Map<String, Value>, name: &str) -> Option<Cow<'a, str>> {
    m.iter()
        .find(|(k, _)| k.strip_prefix("attr__") == Some(name))
        .and_then(|(_, v)| match v {
            Value::String(s) => Some(Cow::Borrowed(s.as_str())),
            Value::Number(n) => Some(Cow::Owned(n.to_string())),
            _ => None,
        })
}

/// Where an event's elements come from, decided once per event.
#[derive(Debug, Clone, Copy)]
pub enum Elements<'a> {
    Chain(&'a str),
    Array(&'a [Value]),
    Props(&'a Map<String, Value>),
}

impl<'a> Elements<'a> {
    /// From an already found chain and `$elements` value, else the properties themselves.
    pub fn from_parts(
        chain: Option<&'a str>,
        elements: Option<&'a Value>,
        props: &'a Map<String, Value>,
    ) -> Elements<'a> {
        if let Some(c) = chain.filter(|c| !c.is_empty()) {
            return Elements::Chain(c);
        }
        if let Some(Value::Array(a)) = elements
            && !a.is_empty()
        {
            return Elements::Array(a);
        }
        Elements::Props(props)
    }

    /// The clicked element.
    pub fn first(&self) -> Option<Element<'a>> {
        self.iter().next()
    }

    /// All elements, clicked element first.
    pub fn iter(&self) -> impl Iterator<Item = Element<'a>> + use<'a> {
        let (chain, array, props) = match *self {
            Elements::Chain(c) => (Some(ChainIter::new(c)), None, None),
            Elements::Array(a) => (None, Some(a.iter()), None),
            Elements::Props(p) => (None, None, Some(p)),
        };
        chain
            .into_iter()
            .flatten()
            .map(Element::Chain)
            .chain(
                array
                    .into_iter()
                    .flatten()
                    .filter_map(|v| v.as_object().map(Element::Json)),
            )
            .chain(props.map(Element::Props))
    }
}

/// Text as a person reads it: trimmed, each whitespace run one space; `None` when nothing is left.
/// Borrows when the text is already tidy (the usual case).
pub fn tidy_text(t: Cow<'_, str>) -> Option<Cow<'_, str>> {
    // Starts true so that leading whitespace, and an empty text, are untidy.
    let mut after_space = true;
    let mut tidy = true;
    for c in t.chars() {
        let space = c.is_whitespace();
        if space && (c != ' ' || after_space) {
            tidy = false;
            break;
        }
        after_space = space;
    }
    let tidy = tidy && !after_space;
    if tidy {
        return Some(t);
    }
    let mut out = String::with_capacity(t.len());
    for word in t.split_whitespace() {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    (!out.is_empty()).then_some(Cow::Owned(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CHAIN: &str = r#"button.btn.btn-primary:text="Upgrade Plan"attr__class="btn btn-primary"attr__id="up"nth-child="1";div.container:nth-child="2""#;

    #[test]
    fn parses_the_clicked_element_of_a_chain() {
        let el = Element::Chain(ChainIter::new(CHAIN).next().unwrap());
        assert_eq!(el.tag().as_deref(), Some("button"));
        assert_eq!(el.text().as_deref(), Some("Upgrade Plan"));
        assert_eq!(el.id().as_deref(), Some("up"));
        assert!(el.has_class("btn-primary"));
        assert!(!el.has_class("btn-secondary"));
        assert_eq!(el.attribute("class").as_deref(), Some("btn btn-primary"));
        assert_eq!(el.attribute("nth-child").as_deref(), Some("1"));
        assert_eq!(ChainIter::new(CHAIN).count(), 2);
    }

    #[test]
    fn element_ends_follow_quotes_and_escapes() {
        assert_eq!(element_end(r#"a:text="x;y";b"#), 12);
        assert_eq!(element_end(r#"a\;b"#), 2);
        assert_eq!(element_end(r#"a:text="x\";y";b"#), 14);
        assert_eq!(element_end(r#"a:text="x\"#), 10);
        assert_eq!(element_end(""), 0);
    }

    #[test]
    fn quotes_and_semicolons_inside_values_do_not_split() {
        let chain = r#"a.nav:text="Say \"hi\"; now"href="/x?a=1;b=2"attr_id="l";body"#;
        let els: Vec<_> = ChainIter::new(chain).collect();
        assert_eq!(els.len(), 2);
        let el = Element::Chain(els[0]);
        assert_eq!(el.text().as_deref(), Some("Say \"hi\"; now"));
        assert_eq!(el.href().as_deref(), Some("/x?a=1;b=2"));
        assert_eq!(el.id().as_deref(), Some("l"));
        assert_eq!(Element::Chain(els[1]).tag().as_deref(), Some("body"));
    }

    #[test]
    fn tailwind_classes_with_colons_stay_classes() {
        let el = ChainElement::parse(r#"button.hover:bg-blue.px-2:text="Go"nth-child="1""#);
        let el = Element::Chain(el);
        assert!(el.has_class("hover:bg-blue"));
        assert_eq!(el.text().as_deref(), Some("Go"));
    }

    #[test]
    fn garbage_never_panics() {
        for s in [
            "",
            ";",
            ":",
            "\"",
            "a:b=\"",
            "a:=\"\\",
            ";;;x.:y=\"z",
            "é.ü:text=\"ö",
        ] {
            for el in ChainIter::new(s) {
                let el = Element::Chain(el);
                let _ = (el.tag(), el.text(), el.id(), el.href(), el.has_class("x"));
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(5000))]

        /// Chains made of the characters the parser reacts to.
        #[test]
        fn random_chains_never_panic(s in r#"[ab:=;."\\ é€_\-12]{0,40}"#) {
            for el in ChainIter::new(&s) {
                let el = Element::Chain(el);
                let _ = (el.tag(), el.text(), el.id(), el.href(), el.classes());
                let _ = (el.has_class("a"), el.attribute("a"), el.attribute("é"));
            }
        }
    }

    #[test]
    fn reads_elements_arrays_and_props() {
        let props = json!({"$elements": [{"tag_name": "a", "$el_text": "Docs", "attr__href": "/docs",
            "attr__class": "nav link", "attributes": {"attr__data-attr": "docs-link"}}]});
        let props = props.as_object().unwrap();
        let el = Elements::from_parts(None, props.get("$elements"), props)
            .first()
            .unwrap();
        assert_eq!(el.tag().as_deref(), Some("a"));
        assert_eq!(el.text().as_deref(), Some("Docs"));
        assert_eq!(el.href().as_deref(), Some("/docs"));
        assert!(el.has_class("link"));
        assert_eq!(el.attribute("data-attr").as_deref(), Some("docs-link"));

        let props = json!({"$el_text": "Buy", "attr__id": "buy"});
        let el = Elements::from_parts(None, None, props.as_object().unwrap())
            .first()
            .unwrap();
        assert_eq!(el.text().as_deref(), Some("Buy"));
        assert_eq!(el.id().as_deref(), Some("buy"));
    }
}
