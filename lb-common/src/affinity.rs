//! When a client's session-affinity entry decides its new flow's backend: the data path's
//! rule, and `lb-agent flow`'s answer, from one function.
use crate::{Affinity, BACKEND_ACTIVE, Backend, Service};

/// `entry` (the client's LB_AFFINITY entry for `svc`) sends a new flow to `backend` (the entry's
/// backend, read from LB_BACKENDS) at `now_ns`: the entry is younger than the service's timeout
/// and the backend is still the one it named (same service, same generation of the id) and takes
/// new flows.
#[inline(always)]
pub fn sticks(entry: &Affinity, backend: &Backend, svc: &Service, now_ns: u64) -> bool {
    let timeout_ns = u64::from(svc.affinity_timeout_s) * 1_000_000_000;
    // Signed: `now` may be a clock tick before the entry's stamp.
    now_ns.wrapping_sub(entry.last_seen_ns).cast_signed() <= timeout_ns.cast_signed()
        && backend.service == svc.id
        && backend.generation == entry.generation
        && backend.flags & BACKEND_ACTIVE != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn an_entry_sticks_while_young_to_an_active_backend_of_its_service() {
        let svc = Service {
            id: 3,
            affinity_timeout_s: 10,
            ..Service::default()
        };
        let backend = Backend {
            service: 3,
            flags: BACKEND_ACTIVE,
            ..Backend::default()
        };
        let entry = Affinity {
            backend: 7,
            generation: 0,
            _pad1: 0,
            _pad2: 0,
            last_seen_ns: 100 * S,
        };
        assert!(sticks(&entry, &backend, &svc, 110 * S));
        assert!(!sticks(&entry, &backend, &svc, 110 * S + 1), "timed out");
        assert!(
            sticks(&entry, &backend, &svc, 100 * S - 1),
            "a tick before the stamp"
        );
        let other = Backend {
            service: 4,
            ..backend
        };
        assert!(
            !sticks(&entry, &other, &svc, 101 * S),
            "id reused by another service"
        );
        let drained = Backend {
            flags: 0,
            ..backend
        };
        assert!(!sticks(&entry, &drained, &svc, 101 * S));
        let reused = Backend {
            generation: 1,
            ..backend
        };
        assert!(
            !sticks(&entry, &reused, &svc, 101 * S),
            "id given to another backend of the same service"
        );
    }
}
