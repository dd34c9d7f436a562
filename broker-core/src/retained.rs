//! Retained messages: a trie of topic names, walked by a subscription's
//! filter, so a SUBSCRIBE costs what matches rather than a scan of every
//! retained message.
//!
//! Each topic keeps the version (a hybrid logical clock) of its last write,
//! deletions included, so that nodes replicating retained messages agree
//! on the last writer whatever order the writes arrive in.

use crate::hashing::HashMap;

use crate::hlc::Hlc;
use crate::message::Message;

#[derive(Debug, Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    /// The last write to this topic: a message, or a deletion (`None`).
    last: Option<(Hlc, Option<Message>)>,
}

/// Dropped from an explicit stack, never recursively: topic depth is the
/// network's choice.
impl Drop for Node {
    fn drop(&mut self) {
        let mut stack: Vec<Node> = self.children.drain().map(|(_, n)| n).collect();
        while let Some(mut n) = stack.pop() {
            stack.extend(n.children.drain().map(|(_, c)| c));
        }
    }
}

/// The retained messages of one node.
#[derive(Debug, Default)]
pub struct Retained {
    root: Node,
    len: usize,
}

impl Retained {
    /// Applies a write if it is newer than the topic's last one: `Some`
    /// stores a message, `None` deletes. Returns whether it applied. A
    /// deletion of a topic never written leaves nothing behind, so empty
    /// retained publishes to new topics cannot grow memory.
    pub fn set(&mut self, topic: &str, message: Option<Message>, version: Hlc) -> bool {
        if message.is_none() && self.version(topic).is_none() {
            return false;
        }
        let mut node = &mut self.root;
        for level in topic.split('/') {
            node = node.children.entry(level.into()).or_default();
        }
        if node.last.as_ref().is_some_and(|(v, _)| *v >= version) {
            return false;
        }
        let had = node.last.as_ref().is_some_and(|(_, m)| m.is_some());
        let has = message.is_some();
        node.last = Some((version, message));
        match (had, has) {
            (false, true) => self.len += 1,
            (true, false) => self.len -= 1,
            _ => {}
        }
        true
    }

    /// The retained message on `topic`.
    pub fn get(&self, topic: &str) -> Option<&Message> {
        let mut node = &self.root;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        node.last.as_ref().and_then(|(_, m)| m.as_ref())
    }

    /// The version of `topic`'s last write, deletions included.
    pub fn version(&self, topic: &str) -> Option<Hlc> {
        let mut node = &self.root;
        for level in topic.split('/') {
            node = node.children.get(level)?;
        }
        node.last.as_ref().map(|(v, _)| *v)
    }

    /// Forgets deletions older than `before` and prunes the nodes they
    /// leave empty. Deletion markers only matter while an older write could
    /// still arrive from another node; after that they are garbage.
    /// Iterative, like every walk here. Returns how many were forgotten.
    pub fn prune_deletions(&mut self, before: Hlc) -> usize {
        let mut paths: Vec<String> = Vec::new();
        let mut stack: Vec<(&Node, String)> = self
            .root
            .children
            .iter()
            .map(|(k, n)| (n, k.to_string()))
            .collect();
        while let Some((n, path)) = stack.pop() {
            if matches!(&n.last, Some((v, None)) if *v < before) {
                paths.push(path.clone());
            }
            stack.extend(n.children.iter().map(|(k, c)| (c, format!("{path}/{k}"))));
        }
        for p in &paths {
            self.remove_marker(p);
        }
        paths.len()
    }

    /// Every stored write with its topic and version, deletion markers
    /// included (a peer needs those too, or an older copy would win), but
    /// not the node-local `$SYS` tree. Iterative.
    pub fn all(&self) -> Vec<(String, Option<Message>, Hlc)> {
        let mut out = Vec::new();
        let mut stack: Vec<(&Node, String)> = self
            .root
            .children
            .iter()
            .filter(|(k, _)| &***k != "$SYS")
            .map(|(k, n)| (n, k.to_string()))
            .collect();
        while let Some((n, path)) = stack.pop() {
            if let Some((v, m)) = &n.last {
                out.push((path.clone(), m.clone(), *v));
            }
            stack.extend(n.children.iter().map(|(k, c)| (c, format!("{path}/{k}"))));
        }
        out
    }

    /// Clears `topic`'s deletion marker and removes the branch it leaves
    /// empty (one walk to find the highest node that keeps something, one
    /// to cut below it).
    fn remove_marker(&mut self, topic: &str) {
        let levels: Vec<&str> = topic.split('/').collect();
        let mut cut = 0;
        let mut node = &mut self.root;
        for (depth, level) in levels.iter().enumerate() {
            if depth == 0 || node.last.is_some() || node.children.len() > 1 {
                cut = depth;
            }
            match node.children.get_mut(*level) {
                Some(n) => node = n,
                None => return,
            }
        }
        node.last = None;
        if !node.children.is_empty() {
            return;
        }
        let mut parent = &mut self.root;
        for level in levels.iter().take(cut) {
            match parent.children.get_mut(*level) {
                Some(n) => parent = n,
                None => return,
            }
        }
        if let Some(level) = levels.get(cut) {
            parent.children.remove(*level);
        }
    }

    /// Retained messages stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True with none stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Calls `f` for every retained message whose topic `filter` matches.
    /// Iterative; `+` and `#` at the first level skip `$` topics (4.7.2).
    pub fn matching<'a>(&'a self, filter: &str, mut f: impl FnMut(&'a Message)) {
        let levels: Vec<&str> = filter.split('/').collect();
        let mut stack: Vec<(&'a Node, usize)> = vec![(&self.root, 0)];
        let visible = |depth: usize, name: &str| depth > 0 || !name.starts_with('$');
        while let Some((node, depth)) = stack.pop() {
            let Some(level) = levels.get(depth) else {
                if let Some((_, Some(m))) = &node.last {
                    f(m);
                }
                continue;
            };
            match *level {
                "#" => {
                    // The parent level too ("a/#" matches "a"), then the
                    // whole subtree.
                    if depth > 0 {
                        if let Some((_, Some(m))) = &node.last {
                            f(m);
                        }
                    }
                    let mut sub: Vec<&'a Node> = node
                        .children
                        .iter()
                        .filter(|(name, _)| visible(depth, name))
                        .map(|(_, n)| n)
                        .collect();
                    while let Some(n) = sub.pop() {
                        if let Some((_, Some(m))) = &n.last {
                            f(m);
                        }
                        sub.extend(n.children.values());
                    }
                }
                "+" => stack.extend(
                    node.children
                        .iter()
                        .filter(|(name, _)| visible(depth, name))
                        .map(|(_, n)| (n, depth + 1)),
                ),
                literal => {
                    if let Some(n) = node.children.get(literal) {
                        stack.push((n, depth + 1));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trie::filter_matches;
    use bytes::Bytes;
    use mqlb_protocol::{MqttStr, QoS};
    use std::sync::Arc;
    use std::time::Instant;

    fn msg(topic: &str) -> Message {
        Message {
            topic: MqttStr::try_from(topic).unwrap_or_default(),
            payload: Bytes::from_static(b"x"),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: Arc::default(),
            origin: None,
            received: Instant::now(),
        }
    }

    fn v(n: u64) -> Hlc {
        Hlc {
            wall_ms: n,
            logical: 0,
            node: 0,
        }
    }

    /// The walk agrees with the reference matcher on every filter/topic pair.
    #[test]
    fn matching_agrees_with_the_reference_matcher() {
        let topics = [
            "a", "a/b", "a/b/c", "a//b", "/x", "$SYS/x", "$SYS", "b", "x/b/y", "a/c",
        ];
        let filters = [
            "#", "a/#", "a/+", "+", "+/+", "$SYS/#", "+/b/#", "a//b", "/+", "a/b", "+/#",
        ];
        let mut r = Retained::default();
        for (i, t) in topics.iter().enumerate() {
            assert!(r.set(t, Some(msg(t)), v(i as u64 + 1)));
        }
        assert_eq!(r.len(), topics.len());
        for f in filters {
            let mut got: Vec<String> = Vec::new();
            r.matching(f, |m| got.push(m.topic.to_string()));
            got.sort();
            let mut want: Vec<String> = topics
                .iter()
                .filter(|t| filter_matches(f, t))
                .map(|t| t.to_string())
                .collect();
            want.sort();
            assert_eq!(got, want, "filter {f}");
        }
    }

    #[test]
    fn last_writer_wins_deletes_included() {
        let mut r = Retained::default();
        assert!(r.set("t", Some(msg("t")), v(5)));
        // An older write arriving late changes nothing.
        assert!(!r.set("t", None, v(4)));
        assert!(r.get("t").is_some());
        assert!(r.set("t", None, v(6)));
        assert!(r.get("t").is_none());
        assert_eq!(r.len(), 0);
        // The deletion's version still wins over an older set.
        assert!(!r.set("t", Some(msg("t")), v(5)));
        assert_eq!(r.version("t"), Some(v(6)));
    }

    #[test]
    fn deletions_leave_nothing_behind_for_long() {
        let mut r = Retained::default();
        // Deleting what was never there stores nothing.
        for i in 0..1000 {
            assert!(!r.set(&format!("junk/{i}"), None, v(1)));
        }
        assert!(r.root.children.is_empty());
        r.set("a/b/c", Some(msg("a/b/c")), v(2));
        r.set("a/x", Some(msg("a/x")), v(3));
        r.set("a/b/c", None, v(4));
        assert_eq!(r.len(), 1);
        // Markers newer than the cutoff stay; older ones go with their branch.
        assert_eq!(r.prune_deletions(v(4)), 0);
        assert_eq!(r.prune_deletions(v(5)), 1);
        assert!(!r.root.children["a"].children.contains_key("b"));
        assert!(r.get("a/x").is_some());
        assert_eq!(r.version("a/b/c"), None);
    }

    #[test]
    fn deep_topics_do_not_recurse() {
        std::thread::Builder::new()
            .stack_size(64 * 1024)
            .spawn(|| {
                let deep = "/".repeat(100_000);
                let mut r = Retained::default();
                r.set(&deep, Some(msg("x")), v(1));
                let mut n = 0;
                r.matching("#", |_| n += 1);
                assert_eq!(n, 1);
                drop(r);
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
