//! The subscription trie: a publish costs O(topic depth + matches), never a
//! scan of every filter.
//!
//! Levels are split on `/`. `+` and `#` are ordinary children looked up
//! alongside the literal level. Per MQTT 4.7.2, a filter starting with a
//! wildcard does not match topics starting with `$`.

use crate::hashing::HashMap;
use std::hash::Hash;

/// A trie node.
#[derive(Debug)]
struct Node<K, V> {
    children: HashMap<Box<str>, Node<K, V>>,
    /// Subscribers whose filter ends at this node.
    subscribers: HashMap<K, V>,
}

impl<K, V> Default for Node<K, V> {
    fn default() -> Self {
        Self {
            children: HashMap::default(),
            subscribers: HashMap::default(),
        }
    }
}

impl<K, V> Node<K, V> {
    fn is_empty(&self) -> bool {
        self.children.is_empty() && self.subscribers.is_empty()
    }
}

/// Children are dropped from an explicit stack: the default drop glue would
/// recurse once per level, and the depth of a trie is set by its filters.
impl<K, V> Drop for Node<K, V> {
    fn drop(&mut self) {
        let mut stack: Vec<Node<K, V>> = self.children.drain().map(|(_, n)| n).collect();
        while let Some(mut n) = stack.pop() {
            stack.extend(n.children.drain().map(|(_, c)| c));
            // `n` drops here with no children: no recursion.
        }
    }
}

/// Filters → subscribers (`K`) with a value each (their options).
///
/// Every walk (insert, remove, match, drop) is a loop with an explicit
/// stack, never recursion: a filter's depth comes from the network, and a
/// recursive walk over 65,000 levels overflows a worker's stack.
#[derive(Debug)]
pub struct Trie<K, V> {
    root: Node<K, V>,
    len: usize,
}

impl<K, V> Default for Trie<K, V> {
    fn default() -> Self {
        Self {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<K: Eq + Hash, V> Trie<K, V> {
    /// Adds or replaces `client`'s subscription to `filter`. Returns true if
    /// it replaced an existing one.
    pub fn insert(&mut self, filter: &str, client: K, value: V) -> bool {
        let mut node = &mut self.root;
        for level in filter.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        let replaced = node.subscribers.insert(client, value).is_some();
        if !replaced {
            self.len += 1;
        }
        replaced
    }

    /// Removes `client`'s subscription to `filter`; prunes empty nodes.
    ///
    /// One walk down finds the subscription and the highest node from which
    /// the path below would be left empty (the "cut"); a second walk down to
    /// the cut removes that branch. O(depth), no recursion.
    pub fn remove(&mut self, filter: &str, client: &K) -> Option<V> {
        let levels: Vec<&str> = filter.split('/').collect();
        // Depth of the node whose child `levels[cut]` goes if the leaf
        // empties: the deepest node on the path that keeps something else
        // (subscribers, another child) or is the root.
        let mut cut = 0;
        let mut node = &mut self.root;
        for (depth, level) in levels.iter().enumerate() {
            if depth == 0 || !node.subscribers.is_empty() || node.children.len() > 1 {
                cut = depth;
            }
            node = node.children.get_mut(*level)?;
        }
        let v = node.subscribers.remove(client)?;
        self.len -= 1;
        if node.is_empty() {
            let mut parent = &mut self.root;
            for level in levels.iter().take(cut) {
                match parent.children.get_mut(*level) {
                    Some(next) => parent = next,
                    None => return Some(v),
                }
            }
            if let Some(level) = levels.get(cut) {
                parent.children.remove(*level);
            }
        }
        Some(v)
    }

    /// Whether `client` holds a subscription to exactly `filter`.
    pub fn contains(&self, filter: &str, client: &K) -> bool {
        let mut node = &self.root;
        for level in filter.split('/') {
            match node.children.get(level) {
                Some(n) => node = n,
                None => return false,
            }
        }
        node.subscribers.contains_key(client)
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
    pub fn matches<'a>(&'a self, topic: &str, mut f: impl FnMut(&'a K, &'a V)) {
        let levels: Vec<&str> = topic.split('/').collect();
        let dollar = topic.starts_with('$');
        // (node, how many levels it has consumed). A `+` and a literal child
        // both continue, so the stack holds at most two entries per level.
        let mut stack: Vec<(&'a Node<K, V>, usize)> = vec![(&self.root, 0)];
        while let Some((node, depth)) = stack.pop() {
            // Per MQTT 4.7.2, a wildcard first level does not match `$` topics.
            let wild_ok = !(depth == 0 && dollar);
            // `#` matches the parent level too ("a/#" matches "a").
            if wild_ok {
                if let Some(hash) = node.children.get("#") {
                    for (c, v) in &hash.subscribers {
                        f(c, v);
                    }
                }
            }
            let Some(level) = levels.get(depth) else {
                for (c, v) in &node.subscribers {
                    f(c, v);
                }
                continue;
            };
            if let Some(child) = node.children.get(*level) {
                stack.push((child, depth + 1));
            }
            if wild_ok {
                if let Some(plus) = node.children.get("+") {
                    stack.push((plus, depth + 1));
                }
            }
        }
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

    fn subs(t: &Trie<String, u8>, topic: &str) -> Vec<String> {
        let mut out = Vec::new();
        t.matches(topic, |c, _| out.push(c.to_string()));
        out.sort();
        out
    }

    #[test]
    fn wildcards_and_dollar_topics() {
        let mut t = Trie::default();
        t.insert("a/b", "exact".to_string(), 0);
        t.insert("a/+", "plus".to_string(), 0);
        t.insert("a/#", "hash".to_string(), 0);
        t.insert("#", "all".to_string(), 0);
        t.insert("+/b", "plusfirst".to_string(), 0);
        t.insert("$SYS/#", "sys".to_string(), 0);
        assert_eq!(
            subs(&t, "a/b"),
            ["all", "exact", "hash", "plus", "plusfirst"]
        );
        assert_eq!(subs(&t, "a"), ["all", "hash"]);
        assert_eq!(subs(&t, "a/b/c"), ["all", "hash"]);
        assert_eq!(subs(&t, "$SYS/x"), ["sys"]);
        assert_eq!(subs(&t, "x/b"), ["all", "plusfirst"]);
        assert_eq!(t.len(), 6);
        assert_eq!(t.remove("a/+", &"plus".to_string()), Some(0));
        assert_eq!(t.remove("a/+", &"plus".to_string()), None);
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
            t.insert(f, "c".to_string(), ());
            for topic in topics {
                let via_trie = !subs_unit(&t, topic).is_empty();
                assert_eq!(via_trie, filter_matches(f, topic), "{f} vs {topic}");
            }
        }
    }

    /// Regression: a 65,000-level filter overflowed the worker's stack in
    /// remove, match and drop. The codec now refuses such filters, but the
    /// trie must not depend on that: every walk is iterative.
    #[test]
    fn very_deep_filters_do_not_recurse() {
        // Run on a small stack so any recursion per level fails loudly.
        let t = std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(|| {
                let deep = "/".repeat(200_000);
                let deep_plus = format!("{}#", "+/".repeat(50_000));
                let mut t = Trie::default();
                t.insert(&deep, "a".to_string(), 1u8);
                t.insert(&deep_plus, "b".to_string(), 2u8);
                t.insert("x", "c".to_string(), 3u8);
                let mut hits = Vec::new();
                t.matches(&deep, |c, _| hits.push(c.to_string()));
                hits.sort();
                assert_eq!(hits, ["a", "b"]);
                assert_eq!(t.remove(&deep, &"a".to_string()), Some(1));
                assert_eq!(t.remove(&deep, &"a".to_string()), None);
                assert_eq!(t.len(), 2);
                // Pruned: only the `+` chain and `x` remain under the root.
                assert_eq!(t.root.children.len(), 2);
                assert_eq!(t.remove(&deep_plus, &"b".to_string()), Some(2));
                assert_eq!(t.root.children.len(), 1);
                // Drop a deep trie too.
                let mut t2 = Trie::default();
                t2.insert(&deep, "a".to_string(), 0u8);
                drop(t2);
            })
            .expect("spawn");
        t.join().expect("no stack overflow");
    }

    #[test]
    fn remove_prunes_only_what_it_emptied() {
        let mut t = Trie::default();
        t.insert("a/b/c/d", "x".to_string(), 0);
        t.insert("a/b", "y".to_string(), 0);
        t.insert("a/e", "z".to_string(), 0);
        assert_eq!(t.remove("a/b/c/d", &"x".to_string()), Some(0));
        // "a/b" keeps its subscriber and loses its empty "c" branch.
        let b = &t.root.children["a"].children["b"];
        assert!(b.children.is_empty());
        assert_eq!(subs(&t, "a/b"), ["y"]);
        assert_eq!(t.remove("a/b", &"y".to_string()), Some(0));
        assert!(!t.root.children["a"].children.contains_key("b"));
        assert_eq!(subs(&t, "a/e"), ["z"]);
        assert_eq!(t.remove("a/e", &"z".to_string()), Some(0));
        assert!(t.root.children.is_empty());
        assert!(t.is_empty());
        // Removing a filter that was never there changes nothing.
        assert_eq!(t.remove("q/r", &"x".to_string()), None);
    }

    /// The trie and the reference matcher agree on random filters and topics.
    #[test]
    fn trie_agrees_with_reference_matcher_on_random_input() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let words = ["a", "b", "", "$x"];
        for _ in 0..300 {
            let mut t = Trie::default();
            let mut filters = Vec::new();
            for i in 0..6 {
                let n = 1 + next() % 4;
                let mut levels = Vec::new();
                for j in 0..n {
                    let w = match next() % 6 {
                        0 => "+",
                        1 if j == n - 1 => "#",
                        k => words[(k as usize) % words.len()],
                    };
                    levels.push(w);
                }
                let f = levels.join("/");
                t.insert(&f, format!("c{i}"), ());
                filters.push((f, format!("c{i}")));
            }
            for _ in 0..10 {
                let n = 1 + next() % 4;
                let topic: Vec<&str> = (0..n).map(|_| words[(next() % 4) as usize]).collect();
                let topic = topic.join("/");
                let mut want: Vec<String> = filters
                    .iter()
                    .filter(|(f, _)| filter_matches(f, &topic))
                    .map(|(_, c)| c.clone())
                    .collect();
                want.sort();
                let mut got = subs_unit(&t, &topic);
                got.sort();
                assert_eq!(got, want, "topic {topic:?} filters {filters:?}");
            }
        }
    }

    fn subs_unit(t: &Trie<String, ()>, topic: &str) -> Vec<String> {
        let mut out = Vec::new();
        t.matches(topic, |c, _| out.push(c.to_string()));
        out
    }
}
