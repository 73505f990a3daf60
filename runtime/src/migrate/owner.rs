//! Who is whose replacement: the migration key of a pod's container.
//!
//! A replacement pod is one the same controller made from the same pod template. Its
//! containers' state is keyed by (Kubernetes namespace, owner, container name), where the
//! owner comes from the pod's labels (CRI keeps them as the sandbox container's labels):
//!
//! - a Deployment's or ReplicaSet's pod: its `pod-template-hash` label (one per template
//!   revision, shared by every replica);
//! - a StatefulSet's pod: its name (`statefulset.kubernetes.io/pod-name`, the stable
//!   identity a StatefulSet gives each replica) together with `controller-revision-hash`,
//!   so that a pod whose template changed meanwhile starts cold instead of inheriting the
//!   old template's processes;
//! - a bare pod, or any pod whose owner should be chosen by hand: the annotation
//!   `runc-architect.io/migration-key`, which wins over the labels.
//!
//! A pod with none of these has no key and never restores another pod's state. Pure: no
//! I/O, so the shim reads the labels and annotations and this decides.

use std::collections::HashMap;

use runc_architect_store::reference::validate_name;
use runc_architect_store::{CheckpointKey, StoreError};

/// A Deployment's (ReplicaSet's) template revision.
pub const POD_TEMPLATE_HASH: &str = "pod-template-hash";
/// A StatefulSet pod's stable name.
pub const STATEFULSET_POD_NAME: &str = "statefulset.kubernetes.io/pod-name";
/// A StatefulSet pod's template revision.
pub const CONTROLLER_REVISION_HASH: &str = "controller-revision-hash";
/// The owner chosen by hand (a pod annotation, passed to the container's spec).
pub const MIGRATION_KEY_ANNOTATION: &str = "runc-architect.io/migration-key";

/// Longest owner value taken (a Kubernetes label value is at most 63 characters).
const MAX_VALUE: usize = 63;

/// Where a container's migrated state comes from and goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// Replicas of one Deployment / ReplicaSet template.
    Template { hash: String },
    /// One StatefulSet pod, at one template revision.
    StatefulSet { pod: String, revision: String },
    /// Chosen by the pod's annotation.
    Annotated { key: String },
}

impl Owner {
    /// The owner's segment of the store key (prefixed by kind, so that kinds never meet).
    fn segment(&self) -> String {
        match self {
            Owner::Template { hash } => format!("rs-{hash}"),
            Owner::StatefulSet { pod, revision } => format!("sts-{pod}-{revision}"),
            Owner::Annotated { key } => format!("key-{key}"),
        }
    }
}

/// A container's migration key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationKey {
    pub namespace: String,
    pub owner: Owner,
    pub container: String,
}

/// A value that cannot be part of a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name} {value:?}: {reason}")]
pub struct OwnerError {
    pub name: &'static str,
    pub value: String,
    pub reason: String,
}

/// `value` as one segment of a store key (the store's own name rules), at most as long as
/// a Kubernetes label value.
fn checked(name: &'static str, value: &str) -> Result<String, OwnerError> {
    if value.len() > MAX_VALUE {
        return Err(OwnerError {
            name,
            value: value.to_string(),
            reason: "longer than 63 characters".into(),
        });
    }
    validate_name(name, value).map_err(|e| OwnerError {
        name,
        value: value.to_string(),
        reason: match e {
            StoreError::InvalidName { reason, .. } => reason.to_string(),
            other => other.to_string(),
        },
    })?;
    Ok(value.to_string())
}

impl MigrationKey {
    /// The key of container `container` of a pod in Kubernetes namespace `namespace`, from
    /// the pod's labels and the container's annotations. `Ok(None)`: the pod has no owner
    /// to inherit from. A malformed annotation is an error (the caller refuses the create,
    /// naming it); malformed labels (which Kubernetes would not have let through) leave
    /// the pod without a key.
    pub fn of_pod(
        namespace: &str,
        container: &str,
        labels: &HashMap<String, String>,
        annotations: &HashMap<String, String>,
    ) -> Result<Option<MigrationKey>, OwnerError> {
        let namespace = checked("namespace", namespace)?;
        let container = checked("container name", container)?;
        let owner = if let Some(key) = annotations.get(MIGRATION_KEY_ANNOTATION) {
            Some(Owner::Annotated {
                key: checked(MIGRATION_KEY_ANNOTATION, key)?,
            })
        } else if let Some(pod) = labels.get(STATEFULSET_POD_NAME) {
            let revision = labels.get(CONTROLLER_REVISION_HASH);
            match (
                checked(STATEFULSET_POD_NAME, pod),
                revision.map(|r| checked(CONTROLLER_REVISION_HASH, r)),
            ) {
                (Ok(pod), Some(Ok(revision))) => Some(Owner::StatefulSet { pod, revision }),
                _ => None,
            }
        } else {
            labels
                .get(POD_TEMPLATE_HASH)
                .and_then(|h| checked(POD_TEMPLATE_HASH, h).ok())
                .map(|hash| Owner::Template { hash })
        };
        Ok(owner.map(|owner| MigrationKey {
            namespace,
            owner,
            container,
        }))
    }

    /// The key in the checkpoint store: (namespace, owner segment, container).
    pub fn checkpoint_key(&self) -> Result<CheckpointKey, StoreError> {
        CheckpointKey::new(&self.namespace, &self.owner.segment(), &self.container)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn key(labels: &[(&str, &str)], ann: &[(&str, &str)]) -> Option<MigrationKey> {
        MigrationKey::of_pod("shop", "web", &map(labels), &map(ann)).expect("valid")
    }

    #[test]
    fn replicas_of_one_template_share_a_key() {
        let a = key(&[(POD_TEMPLATE_HASH, "6d4b9c7f8"), ("app", "web")], &[]).expect("a key");
        let b = key(&[(POD_TEMPLATE_HASH, "6d4b9c7f8"), ("app", "other")], &[]).expect("a key");
        assert_eq!(a, b);
        assert_eq!(
            a.owner,
            Owner::Template {
                hash: "6d4b9c7f8".into()
            }
        );
        assert_eq!(
            a.checkpoint_key().unwrap().to_string(),
            "shop/rs-6d4b9c7f8/web"
        );
        let next = key(&[(POD_TEMPLATE_HASH, "59f7d8c6b")], &[]).expect("a key");
        assert_ne!(a, next, "a new template revision does not inherit");
    }

    #[test]
    fn a_statefulset_pod_is_its_name_at_its_revision() {
        let labels = [
            (STATEFULSET_POD_NAME, "db-1"),
            (CONTROLLER_REVISION_HASH, "db-7b9f"),
        ];
        let k = key(&labels, &[]).expect("a key");
        assert_eq!(
            k.checkpoint_key().unwrap().to_string(),
            "shop/sts-db-1-db-7b9f/web"
        );
        assert_ne!(
            k,
            key(
                &[
                    (STATEFULSET_POD_NAME, "db-2"),
                    (CONTROLLER_REVISION_HASH, "db-7b9f")
                ],
                &[]
            )
            .unwrap(),
            "replicas of a StatefulSet keep their own state"
        );
        assert_eq!(
            key(&[(STATEFULSET_POD_NAME, "db-1")], &[]),
            None,
            "without the revision a changed template could inherit"
        );
    }

    #[test]
    fn the_annotation_wins_and_bare_pods_have_no_key_without_it() {
        let k = key(
            &[(POD_TEMPLATE_HASH, "6d4b9c7f8")],
            &[(MIGRATION_KEY_ANNOTATION, "cache-v2")],
        )
        .expect("a key");
        assert_eq!(
            k.owner,
            Owner::Annotated {
                key: "cache-v2".into()
            }
        );
        assert_eq!(key(&[("app", "web")], &[]), None);
    }

    #[test]
    fn kinds_and_namespaces_never_meet() {
        let rs = key(&[(POD_TEMPLATE_HASH, "x1")], &[]).unwrap();
        let ann = key(&[], &[(MIGRATION_KEY_ANNOTATION, "x1")]).unwrap();
        assert_ne!(rs.checkpoint_key().unwrap(), ann.checkpoint_key().unwrap());
        let other_ns = MigrationKey::of_pod(
            "staging",
            "web",
            &map(&[(POD_TEMPLATE_HASH, "x1")]),
            &HashMap::new(),
        )
        .unwrap()
        .unwrap();
        assert_ne!(
            rs.checkpoint_key().unwrap(),
            other_ns.checkpoint_key().unwrap()
        );
    }

    #[test]
    fn a_malformed_annotation_is_refused_by_name() {
        for bad in ["", "a/b", "-x", &"k".repeat(64)] {
            let err = MigrationKey::of_pod(
                "shop",
                "web",
                &HashMap::new(),
                &map(&[(MIGRATION_KEY_ANNOTATION, bad)]),
            )
            .expect_err("refused");
            assert_eq!(err.name, MIGRATION_KEY_ANNOTATION);
            assert!(err.to_string().contains(MIGRATION_KEY_ANNOTATION), "{err}");
        }
        // Labels Kubernetes would have refused: no key, no error.
        assert_eq!(key(&[(POD_TEMPLATE_HASH, "a b")], &[]), None);
    }
}
