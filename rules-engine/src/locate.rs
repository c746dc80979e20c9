//! Where each key and list item of a rule file sits, so a problem found after parsing (a bad
//! regex, an undeclared intent) is reported at the key it concerns, not at the rule's first line.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// Positions (1-based line and column) by path: `rules.3.when.element.text` is the key `text`,
/// `rules.3` the fourth rule's list item.
#[derive(Debug, Default)]
pub(crate) struct KeyPositions(HashMap<String, (usize, usize)>);

impl KeyPositions {
    /// The positions in `text`; empty for text that does not parse (its parse error is reported).
    pub fn of(text: &str) -> KeyPositions {
        let mut walk = Walk::default();
        let mut parser = Parser::new_from_str(text);
        if parser.load(&mut walk, false).is_err() {
            return KeyPositions::default();
        }
        KeyPositions(walk.found)
    }

    /// The position of `path`, else of its nearest ancestor that has one, else (1, 1).
    pub fn at(&self, path: &str) -> (usize, usize) {
        let mut p = path;
        loop {
            if let Some(&pos) = self.0.get(p) {
                return pos;
            }
            match p.rfind('.') {
                Some(i) => p = &p[..i],
                None => return (1, 1),
            }
        }
    }
}

enum Frame {
    /// The mapping's path, and the key read whose value comes next.
    Map { path: String, key: Option<String> },
    /// The sequence's path and the index of its next item.
    Seq { path: String, next: usize },
}

#[derive(Default)]
struct Walk {
    stack: Vec<Frame>,
    found: HashMap<String, (usize, usize)>,
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

impl Walk {
    /// Called for every node: returns the path of a node starting here (a value or an item), or
    /// `None` when the node is a mapping key (recorded instead).
    fn node(&mut self, scalar: Option<&str>, mark: Marker) -> Option<String> {
        let pos = (mark.line(), mark.col() + 1);
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Map { path, key }) => match key.take() {
                Some(k) => Some(join(path, &k)),
                None => {
                    // A key: non-scalar keys are not used by rule files.
                    let k = scalar.unwrap_or("?").to_owned();
                    self.found.entry(join(path, &k)).or_insert(pos);
                    *key = Some(k);
                    None
                }
            },
            Some(Frame::Seq { path, next }) => {
                let p = join(path, &next.to_string());
                *next += 1;
                self.found.entry(p.clone()).or_insert(pos);
                Some(p)
            }
        }
    }
}

impl MarkedEventReceiver for Walk {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match ev {
            Event::Scalar(v, ..) => {
                self.node(Some(&v), mark);
            }
            Event::Alias(_) => {
                self.node(None, mark);
            }
            Event::MappingStart(..) => {
                let path = self.node(None, mark).unwrap_or_default();
                self.stack.push(Frame::Map { path, key: None });
            }
            Event::SequenceStart(..) => {
                let path = self.node(None, mark).unwrap_or_default();
                self.stack.push(Frame::Seq { path, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_keys_in_block_and_flow_style() {
        let text = "rules:\n  - id: a\n    when:\n      element:\n        text: { regex: \"(\" }\n  - id: b\n    say: x\n";
        let k = KeyPositions::of(text);
        assert_eq!(k.at("rules.0.id"), (2, 5));
        assert_eq!(k.at("rules.0.when.element.text"), (5, 9));
        assert_eq!(k.at("rules.0.when.element.text.regex"), (5, 17));
        assert_eq!(k.at("rules.1.say"), (7, 5));
        // Unknown paths fall back to the nearest ancestor.
        assert_eq!(k.at("rules.1.say.nothing"), (7, 5));
        assert_eq!(KeyPositions::of("a: [").at("a"), (1, 1));
    }
}
