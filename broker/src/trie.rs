//! The subscription trie: a publish costs O(topic depth + matches), never a
//! scan of every filter.
//!
//! Levels are split on `/`. `+` and `#` are ordinary children looked up
//! alongside the literal level. Per MQTT 4.7.2, a filter starting with a
//! wildcard does not match topics starting with `$`.

use std::collections::HashMap;

/// A trie node.
#[derive(Debug)]
struct Node<V> {
    children: HashMap<Box<str>, Node<V>>,
    /// Subscribers whose filter ends at this node, by client ID.
    subscribers: HashMap<Box<str>, V>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Self {
            children: HashMap::new(),
            subscribers: HashMap::new(),
        }
    }
}

impl<V> Node<V> {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subscribers.is_empty()
    }
}

/// Filters → subscribers with a value each (their options).
#[derive(Debug)]
pub struct Trie<V> {
    root: Node<V>,
    len: usize,
}

impl<V> Default for Trie<V> {
    fn default() -> Self {
        Self {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<V> Trie<V> {
    /// Adds or replaces `client`'s subscription to `filter`. Returns true if
    /// it replaced an existing one.
    pub fn insert(&mut self, filter: &str, client: &str, value: V) -> bool {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        let replaced = node.subscribers.insert(client.into(), value).is_some();
        if !replaced {
            self.len += 1;
        }
        replaced
    }

    /// Removes `client`'s subscription to `filter`; prunes empty nodes.
    pub fn remove(&mut self, filter: &str, client: &str) -> Option<V> {
        fn walk<V>(node: &mut Node<V>, levels: &[&str], client: &str) -> Option<V> {
            match levels.split_first() {
                None => node.subscribers.remove(client),
                Some((first, rest)) => {
                    let child = node.children.get_mut(*first)?;
                    let v = walk(child, rest, client);
                    if child.is_empty() {
                        node.children.remove(*first);
                    }
                    v
                }
            }
        }
        let levels: Vec<&str> = filter.split('/').collect();
        let v = walk(&mut self.root, &levels, client);
        if v.is_some() {
            self.len -= 1;
        }
        v
    }

    /// Number of (filter, client) subscriptions.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True with no subscriptions.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Calls `f(client, value)` for every subscription matching `topic`. A
    /// client subscribed through several filters is reported once per filter.
    pub fn matches<'a>(&'a self, topic: &str, mut f: impl FnMut(&'a str, &'a V)) {
        let levels: Vec<&str> = topic.split('/').collect();
        let dollar = topic.starts_with('$');
        fn walk<'a, V>(
            node: &'a Node<V>,
            levels: &[&str],
            first: bool,
            dollar: bool,
            f: &mut impl FnMut(&'a str, &'a V),
        ) {
            // `#` matches the parent level too ("a/#" matches "a").
            if let Some(hash) = node.children.get("#") {
                if !(first && dollar) {
                    for (c, v) in &hash.subscribers {
                        f(c, v);
                    }
                }
            }
            let Some((level, rest)) = levels.split_first() else {
                for (c, v) in &node.subscribers {
                    f(c, v);
                }
                return;
            };
            if let Some(child) = node.children.get(*level) {
                walk(child, rest, false, dollar, f);
            }
            if !(first && dollar) {
                if let Some(plus) = node.children.get("+") {
                    walk(plus, rest, false, dollar, f);
                }
            }
        }
        walk(&self.root, &levels, true, dollar, &mut f);
    }
}

/// Whether `filter` matches `topic` (used for retained messages).
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subs(t: &Trie<u8>, topic: &str) -> Vec<String> {
        let mut out = Vec::new();
        t.matches(topic, |c, _| out.push(c.to_string()));
        out.sort();
        out
    }

    #[test]
    fn wildcards_and_dollar_topics() {
        let mut t = Trie::default();
        t.insert("a/b", "exact", 0);
        t.insert("a/+", "plus", 0);
        t.insert("a/#", "hash", 0);
        t.insert("#", "all", 0);
        t.insert("+/b", "plusfirst", 0);
        t.insert("$SYS/#", "sys", 0);
        assert_eq!(
            subs(&t, "a/b"),
            ["all", "exact", "hash", "plus", "plusfirst"]
        );
        assert_eq!(subs(&t, "a"), ["all", "hash"]);
        assert_eq!(subs(&t, "a/b/c"), ["all", "hash"]);
        assert_eq!(subs(&t, "$SYS/x"), ["sys"]);
        assert_eq!(subs(&t, "x/b"), ["all", "plusfirst"]);
        assert_eq!(t.len(), 6);
        assert_eq!(t.remove("a/+", "plus"), Some(0));
        assert_eq!(t.remove("a/+", "plus"), None);
        assert_eq!(subs(&t, "a/c"), ["all", "hash"]);
    }

    #[test]
    fn filter_matching_agrees_with_trie() {
        let filters = [
            "a/b", "a/+", "a/#", "#", "+/+", "+", "$SYS/#", "+/b/#", "a//b", "/+",
        ];
        let topics = ["a/b", "a", "a/b/c", "$SYS/x", "b", "a//b", "/x", "x/b/y"];
        for f in filters {
            let mut t = Trie::default();
            t.insert(f, "c", ());
            for topic in topics {
                let via_trie = !subs_unit(&t, topic).is_empty();
                assert_eq!(via_trie, filter_matches(f, topic), "{f} vs {topic}");
            }
        }
    }

    fn subs_unit(t: &Trie<()>, topic: &str) -> Vec<String> {
        let mut out = Vec::new();
        t.matches(topic, |c, _| out.push(c.to_string()));
        out
    }
}
