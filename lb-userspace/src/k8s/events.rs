//! Warning Events about the cluster's problems, aggregated as Kubernetes' event recorder does:
//! one Event object per problem (involved object, reason, message) per node, with
//! `source.host` (and `reportingInstance`) naming the node; the same problem seen again patches
//! that object's `count` and `lastTimestamp` instead of creating another. Re-posts are
//! rate-limited per problem (the recorder's spam filter has the same purpose), so a cluster of
//! nodes with a lasting problem does not load the API server.
use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::core::v1::{Event as KubeEvent, EventSource, ObjectReference},
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use log::warn;

use super::Problem;

/// `source.component` and `reportingController`.
pub const COMPONENT: &str = "xdplb-agent";
/// A problem is posted (created or counted) at most this often.
pub const REPOST_EVERY: Duration = Duration::from_secs(60);
/// A problem still there is counted again this often, which also keeps its Event from expiring
/// (the API server drops Events an hour after their last update by default).
pub const REFRESH_EVERY: Duration = Duration::from_secs(600);
/// A problem gone this long is forgotten: its Event has expired, a return creates a new one.
const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// What to do about one problem now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Post {
    /// A new Event object with this count.
    Create { count: i32 },
    /// Set the Event object `name`'s count (and lastTimestamp).
    Patch { name: String, count: i32 },
}

/// What is known about one problem's Event.
#[derive(Debug)]
struct Seen {
    /// The Event object, once created.
    name: Option<String>,
    /// The count it has.
    count: i32,
    /// Occurrences not posted yet.
    owed: i32,
    last_post: Option<Instant>,
    present: bool,
    gone_since: Option<Instant>,
}

/// Which problems need an Event created or patched: pure bookkeeping, the API calls are
/// [`Events`]'.
#[derive(Debug, Default)]
pub struct Recorder {
    seen: BTreeMap<Problem, Seen>,
}

impl Recorder {
    /// Takes the current problems (an occurrence: a problem new or back, or still there
    /// [`REFRESH_EVERY`] after its last post) and says what to post; the caller reports each
    /// outcome with [`Recorder::posted`] or [`Recorder::failed`]. Also returns the problems that
    /// just appeared (for the log).
    pub fn due(
        &mut self,
        problems: &[Problem],
        now: Instant,
    ) -> (Vec<(Problem, Post)>, Vec<Problem>) {
        let mut appeared = Vec::new();
        for p in problems {
            let s = self.seen.entry(p.clone()).or_insert(Seen {
                name: None,
                count: 0,
                owed: 0,
                last_post: None,
                present: false,
                gone_since: None,
            });
            if !s.present {
                s.owed += 1;
                appeared.push(p.clone());
            } else if s.owed == 0
                && s.last_post
                    .is_some_and(|t| now.duration_since(t) >= REFRESH_EVERY)
            {
                s.owed += 1;
            }
            s.present = true;
            s.gone_since = None;
        }
        for (p, s) in &mut self.seen {
            if s.present && !problems.contains(p) {
                s.present = false;
                s.gone_since = Some(now);
            }
        }
        self.seen.retain(|_, s| {
            s.gone_since
                .is_none_or(|t| now.duration_since(t) < FORGET_AFTER)
        });
        let due = self
            .seen
            .iter()
            .filter(|(_, s)| {
                s.owed > 0
                    && s.last_post
                        .is_none_or(|t| now.duration_since(t) >= REPOST_EVERY)
            })
            .map(|(p, s)| {
                let count = s.count + s.owed;
                let post = match &s.name {
                    None => Post::Create { count },
                    Some(name) => Post::Patch {
                        name: name.clone(),
                        count,
                    },
                };
                (p.clone(), post)
            })
            .collect();
        (due, appeared)
    }

    /// The Event `name` now has `count`.
    pub fn posted(&mut self, p: &Problem, name: String, count: i32, now: Instant) {
        if let Some(s) = self.seen.get_mut(p) {
            s.owed = (s.count + s.owed - count).max(0);
            s.name = Some(name);
            s.count = count;
            s.last_post = Some(now);
        }
    }

    /// Posting failed; `gone`: the Event no longer exists (expired or deleted), so the next post
    /// creates a new one.
    pub fn failed(&mut self, p: &Problem, gone: bool) {
        if gone && let Some(s) = self.seen.get_mut(p) {
            s.name = None;
            s.owed += s.count;
            s.count = 0;
        }
    }
}

/// Posts the Events [`Recorder`] says are due, as this node.
pub struct Events {
    recorder: Recorder,
    node: String,
}

impl Events {
    pub fn new(node: String) -> Events {
        Events {
            recorder: Recorder::default(),
            node,
        }
    }

    /// Call with the current problems whenever they change, and every few seconds (for
    /// rate-limited re-posts).
    pub async fn report(&mut self, client: &Client, problems: &[Problem]) {
        let (due, appeared) = self.recorder.due(problems, Instant::now());
        for p in appeared {
            warn!("{p}");
        }
        for (p, post) in due {
            let api: Api<KubeEvent> = Api::namespaced(client.clone(), &p.object.0);
            let now = Timestamp::now();
            let result = match post {
                Post::Create { count } => {
                    let event = self.event(&p, now, count);
                    api.create(&PostParams::default(), &event)
                        .await
                        .map(|e| (e.metadata.name.unwrap_or_default(), count))
                }
                Post::Patch { name, count } => {
                    let patch = serde_json::json!({
                        "count": count,
                        "lastTimestamp": Time(now),
                    });
                    api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                        .await
                        .map(|_| (name, count))
                }
            };
            match result {
                Ok((name, count)) => self.recorder.posted(&p, name, count, Instant::now()),
                Err(e) => {
                    let gone = matches!(&e, kube::Error::Api(s) if s.is_not_found());
                    if !gone {
                        warn!("posting an Event about {}/{}: {e}", p.object.0, p.object.1);
                    }
                    self.recorder.failed(&p, gone);
                }
            }
        }
    }

    /// A new Event about `p`, named as the recorder names them (`<object>.<hex nanoseconds>`).
    fn event(&self, p: &Problem, now: Timestamp, count: i32) -> KubeEvent {
        KubeEvent {
            metadata: ObjectMeta {
                name: Some(format!("{}.{:x}", p.object.1, now.as_nanosecond())),
                namespace: Some(p.object.0.clone()),
                ..Default::default()
            },
            involved_object: ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Service".into()),
                namespace: Some(p.object.0.clone()),
                name: Some(p.object.1.clone()),
                ..Default::default()
            },
            reason: Some(p.reason.into()),
            message: Some(format!("{}: {}", p.field, p.message)),
            type_: Some("Warning".into()),
            source: Some(EventSource {
                component: Some(COMPONENT.into()),
                host: Some(self.node.clone()),
            }),
            // As client-go's recorder sets them: the component, and the host it runs on.
            reporting_component: Some(COMPONENT.into()),
            reporting_instance: Some(self.node.clone()),
            first_timestamp: Some(Time(now)),
            last_timestamp: Some(Time(now)),
            count: Some(count),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(message: &str) -> Problem {
        Problem {
            object: ("ns".into(), "web".into()),
            reason: super::super::reason::INVALID_ANNOTATION,
            field: "xdplb.io/mode".into(),
            message: message.into(),
        }
    }

    /// Posts everything due as if the API server took it, returning what was posted.
    fn post(r: &mut Recorder, problems: &[Problem], now: Instant) -> Vec<Post> {
        let (due, _) = r.due(problems, now);
        for (p, post) in &due {
            let (name, count) = match post {
                Post::Create { count } => (format!("{}.1", p.object.1), *count),
                Post::Patch { name, count } => (name.clone(), *count),
            };
            r.posted(p, name, count, now);
        }
        due.into_iter().map(|(_, post)| post).collect()
    }

    #[test]
    fn a_problem_gets_one_event_counted_again_when_it_comes_back_at_most_once_a_minute() {
        let mut r = Recorder::default();
        let a = problem("`fast`: not a mode");
        let one = [a.clone()];
        let t0 = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(post(&mut r, &one, t0), [Post::Create { count: 1 }]);
        // Unchanged: nothing, however often it is reported.
        assert!(post(&mut r, &one, t0 + s(1)).is_empty());
        // Gone and back twice within the minute: held, then counted both times in one patch.
        assert!(post(&mut r, &[], t0 + s(2)).is_empty());
        assert!(post(&mut r, &one, t0 + s(3)).is_empty());
        assert!(post(&mut r, &[], t0 + s(4)).is_empty());
        assert!(post(&mut r, &one, t0 + s(5)).is_empty());
        assert!(post(&mut r, &one, t0 + s(59)).is_empty());
        let name = "web.1".to_string();
        assert_eq!(
            post(&mut r, &one, t0 + s(60)),
            [Post::Patch {
                name: name.clone(),
                count: 3
            }]
        );
        // Still there: counted again only after REFRESH_EVERY.
        assert!(post(&mut r, &one, t0 + s(600)).is_empty());
        assert_eq!(
            post(&mut r, &one, t0 + s(660)),
            [Post::Patch {
                name: name.clone(),
                count: 4
            }]
        );
        // Another message is another Event.
        let b = problem("`faster`: not a mode");
        assert_eq!(
            post(&mut r, &[a.clone(), b], t0 + s(661)),
            [Post::Create { count: 1 }]
        );
        // An expired Event is created again, with the count it had.
        r.failed(&a, true);
        assert_eq!(post(&mut r, &one, t0 + s(720)), [Post::Create { count: 4 }]);
        // Gone for longer than an Event lives: a return starts over.
        assert!(post(&mut r, &[], t0 + s(721)).is_empty());
        assert!(post(&mut r, &[], t0 + s(721) + FORGET_AFTER).is_empty());
        assert_eq!(
            post(&mut r, &one, t0 + s(722) + FORGET_AFTER),
            [Post::Create { count: 1 }]
        );
    }
}
