//! The gateway store's contract: the same cases against every adapter — SQLite (a file per
//! test) and PostgreSQL (the server on 127.0.0.1:5432, or TETHER_TEST_PG; a schema per test,
//! dropped after). PostgreSQL missing is a failure, never a skip. The last test runs a whole
//! fleet (gateway + agents) on the PostgreSQL store.

mod common;

use std::sync::Arc;

use serde_json::json;
use tether::gateway::store::{
    self, AppendOutcome, CancelOutcome, CodeTake, ForwardedCall, IncomingEvent, NewChannelMessage,
    NewEnrolmentCode, NewUpdate, Signal, Store, StoreError, StoreLocation, StoreSettings, UNFENCED,
};
use tether_schemas::{Event, Op, UpdateOp, UpdateStatus};

fn ev(seq: u64) -> IncomingEvent {
    IncomingEvent::from_event(
        &Event {
            seq,
            entity: "patient".into(),
            op: Op::Insert,
            key: json!({"id": seq}).as_object().cloned().unwrap_or_default(),
            row: json!({"id": seq, "name": "n"}).as_object().cloned(),
            committed_at: "2026-01-01T00:00:00.000Z".into(),
        },
        None,
    )
}

fn evs(range: std::ops::RangeInclusive<u64>) -> Vec<IncomingEvent> {
    range.map(ev).collect()
}

fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// A store for one test, and whatever must be cleaned up after it.
struct Fixture {
    store: Arc<Store>,
    location: StoreLocation,
    _dir: Option<tempfile::TempDir>,
    pg_schema: Option<String>,
}

fn pg_url() -> String {
    std::env::var("TETHER_TEST_PG")
        .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".into())
}

impl Fixture {
    fn sqlite() -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let location = StoreLocation::Sqlite(dir.path().join("g.db"));
        Fixture {
            store: open(&location),
            location,
            _dir: Some(dir),
            pg_schema: None,
        }
    }

    fn postgres() -> Fixture {
        let schema = format!(
            "contract_{}_{:x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let location = StoreLocation::Postgres {
            url: pg_url(),
            schema: schema.clone(),
        };
        Fixture {
            store: open(&location),
            location,
            _dir: None,
            pg_schema: Some(schema),
        }
    }

    /// A second store on the same data (a restart, or a second gateway node).
    fn reopen(&self) -> Arc<Store> {
        open(&self.location)
    }

    /// The same data as gateway node `node`.
    fn node(&self, node: &str) -> Arc<Store> {
        open_as(&self.location, node)
    }
}

fn open(location: &StoreLocation) -> Arc<Store> {
    open_as(location, store::DEFAULT_NODE)
}

fn open_as(location: &StoreLocation, node: &str) -> Arc<Store> {
    let mut s = StoreSettings::sqlite("unused");
    s.location = location.clone();
    s.node = node.to_string();
    store::open(&s).unwrap_or_else(|e| panic!("open {location}: {e} (is PostgreSQL running?)"))
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.store.close();
        if let Some(schema) = &self.pg_schema {
            if let Ok(mut c) = ::postgres::Client::connect(&pg_url(), ::postgres::NoTls) {
                let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
            }
        }
    }
}

fn update(clinic: &str) -> NewUpdate {
    NewUpdate {
        clinic_id: clinic.into(),
        entity: "patient".into(),
        op: UpdateOp::Upsert,
        key: json!({"id": 1}).as_object().cloned().unwrap_or_default(),
        row: json!({"id": 1, "name": "cloud"}).as_object().cloned(),
        idempotency_key: None,
        batch_id: None,
    }
}

fn append_duplicates_and_gaps(f: &Fixture) {
    let s = &f.store;
    block(async {
        assert_eq!(s.hello("c1", 0).await.expect("hello").acked, 0);
        let out = s
            .append("c1", 0, UNFENCED, 0, evs(1..=3))
            .await
            .expect("append");
        assert_eq!(
            out,
            AppendOutcome::Stored {
                acked: 3,
                inserted: 3
            }
        );
        // A resend overlapping what is stored: acknowledged, one new row.
        let out = s
            .append("c1", 0, UNFENCED, 1, evs(2..=4))
            .await
            .expect("append");
        assert_eq!(
            out,
            AppendOutcome::Stored {
                acked: 4,
                inserted: 1
            }
        );
        // A gap: nothing stored.
        let out = s
            .append("c1", 0, UNFENCED, 10, evs(11..=11))
            .await
            .expect("append");
        assert_eq!(out, AppendOutcome::Gap { acked: 4 });
        let page = s.events_page(Some("c1"), 0, 100).await.expect("page");
        assert_eq!(
            page.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert_eq!(page[0].key, json!({"id": 1}));
        assert_eq!(page[0].row, Some(json!({"id": 1, "name": "n"})));
        assert_eq!(s.acked_seq("c1").await.expect("acked"), 4);
        assert_eq!(s.acked_seq("nobody").await.expect("acked"), 0);
        // Another clinic's events are its own.
        s.append("c2", 0, UNFENCED, 0, evs(1..=2))
            .await
            .expect("c2");
        assert_eq!(s.events_page(Some("c1"), 0, 100).await.expect("p").len(), 4);
        assert_eq!(s.events_page(None, 0, 100).await.expect("p").len(), 6);
        assert_eq!(
            s.head().await.expect("head"),
            page[3]
                .id
                .max(s.events_page(None, 0, 100).await.expect("p")[5].id)
        );
    });
}

/// Batches of every size (adapters insert in chunks) store each event once, in order, with its
/// own key, row and problem, and a resend overlapping a chunk boundary adds only what is new.
fn large_batches_store_every_event_once_in_order(f: &Fixture) {
    let s = &f.store;
    block(async {
        s.hello("big", 0).await.expect("hello");
        let mut batch = evs(1..=150);
        batch[70].problem = Some("flagged".into());
        let out = s
            .append("big", 0, UNFENCED, 0, batch)
            .await
            .expect("append");
        assert_eq!(
            out,
            AppendOutcome::Stored {
                acked: 150,
                inserted: 150
            }
        );
        let out = s
            .append("big", 0, UNFENCED, 100, evs(101..=237))
            .await
            .expect("resend");
        assert_eq!(
            out,
            AppendOutcome::Stored {
                acked: 237,
                inserted: 87
            }
        );
        let mut seen = Vec::new();
        let mut after = 0;
        loop {
            let page = s.events_page(Some("big"), after, 100).await.expect("page");
            let Some(last) = page.last() else { break };
            after = last.id;
            for e in &page {
                assert_eq!(e.key, json!({"id": e.seq}), "seq {}", e.seq);
                assert_eq!(e.row, Some(json!({"id": e.seq, "name": "n"})));
                assert_eq!(e.problem.is_some(), e.seq == 71, "seq {}", e.seq);
            }
            seen.extend(page.iter().map(|e| e.seq));
        }
        assert_eq!(seen, (1..=237).collect::<Vec<_>>());
    });
}

fn flagged_events_are_stored_with_their_problem(f: &Fixture) {
    let s = &f.store;
    block(async {
        let mut bad = ev(1);
        bad.problem = Some("row.name: not a string".into());
        s.append("c", 0, UNFENCED, 0, vec![bad])
            .await
            .expect("append");
        let page = s.events_page(Some("c"), 0, 10).await.expect("page");
        assert_eq!(page[0].problem.as_deref(), Some("row.name: not a string"));
        // Listed alone, per clinic or across clinics, and counted from a position.
        let mut more = evs(2..=6);
        more[2].problem = Some("row.phone: missing".into());
        s.append("c", 0, UNFENCED, 1, more).await.expect("append");
        let mut other = evs(1..=3);
        other[0].problem = Some("row.id: not an integer".into());
        s.append("d", 0, UNFENCED, 0, other).await.expect("append");
        let c_flagged = s.flagged_events_page(Some("c"), 0, 10).await.expect("page");
        let seqs: Vec<u64> = c_flagged.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 4]);
        let all = s.flagged_events_page(None, 0, 10).await.expect("page");
        assert_eq!(all.len(), 3);
        assert!(all.iter().all(|e| e.problem.is_some()));
        assert!(all.windows(2).all(|w| w[0].id < w[1].id));
        let after_first = s
            .flagged_events_page(None, all[0].id, 1)
            .await
            .expect("page");
        assert_eq!(after_first.len(), 1);
        assert_eq!(after_first[0].id, all[1].id);
        let (n, through) = s.flagged_since(0).await.expect("count");
        assert_eq!((n, through), (3, all[2].id));
        let (n, through) = s.flagged_since(all[1].id).await.expect("count");
        assert_eq!((n, through), (1, all[2].id));
        assert_eq!(
            s.flagged_since(all[2].id).await.expect("count"),
            (0, all[2].id)
        );
        // Counted per clinic for the dashboard; a resend of what is held counts nothing again.
        let mut again = evs(4..=6);
        again[0].problem = Some("row.phone: missing".into());
        s.append("c", 0, UNFENCED, 3, again).await.expect("resend");
        let c = s.clinic("c").await.expect("c").expect("known");
        let d = s.clinic("d").await.expect("d").expect("known");
        assert_eq!((c.flagged_events, d.flagged_events), (2, 1));
    });
}

fn a_recreated_outbox_starts_a_new_position(f: &Fixture) {
    let s = &f.store;
    block(async {
        assert_eq!(s.hello("c", 111).await.expect("hello").acked, 0);
        s.append("c", 111, UNFENCED, 0, evs(1..=3))
            .await
            .expect("a");
        assert_eq!(s.hello("c", 111).await.expect("same outbox").acked, 3);
        // Another database presenting the clinic's identity is refused, and changes nothing.
        match s.hello("c", 222).await {
            Err(StoreError::SourceConflict {
                known: 111,
                offered: 222,
                ..
            }) => {}
            other => panic!("a second source must be refused: {other:?}"),
        }
        assert_eq!(s.hello("c", 111).await.expect("still the old").acked, 3);
        assert!(!s.allow_source_reset("nobody").await.expect("reset"));
        // An operator confirms the re-install: the new database's sequences start again at 1.
        assert!(s.allow_source_reset("c").await.expect("reset"));
        assert_eq!(s.hello("c", 222).await.expect("new outbox").acked, 0);
        let out = s
            .append("c", 222, UNFENCED, 0, evs(1..=2))
            .await
            .expect("b");
        assert_eq!(
            out,
            AppendOutcome::Stored {
                acked: 2,
                inserted: 2
            },
            "stored, not ignored"
        );
        // A late batch from the old outbox is refused.
        let stale = s
            .append("c", 111, UNFENCED, 3, evs(4..=4))
            .await
            .expect("stale");
        assert_eq!(stale, AppendOutcome::Gap { acked: 2 });
        assert_eq!(
            s.events_page(Some("c"), 0, 100).await.expect("page").len(),
            5
        );
        // The history view holds the current outbox only, in storage order.
        let current = s.clinic_events("c", 0, 100).await.expect("current");
        assert_eq!(
            current.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![1, 2]
        );
    });
}

fn an_outbox_that_comes_back_resends_without_duplicates_or_holes(f: &Fixture) {
    // Outbox A (1..=6, with 4 never stored), then B, then A again (a database restored from a
    // backup), each switch confirmed by an operator: A's position restarts at 0, its resent
    // events are held once and the hole is filled.
    let s = &f.store;
    block(async {
        s.hello("c", 111).await.expect("a");
        s.append("c", 111, UNFENCED, 0, evs(1..=3))
            .await
            .expect("1-3");
        s.append("c", 111, UNFENCED, 3, vec![ev(5), ev(6)])
            .await
            .expect("5-6 (4 missing)");
        assert!(s.allow_source_reset("c").await.expect("confirm b"));
        s.hello("c", 222).await.expect("b");
        s.append("c", 222, UNFENCED, 0, evs(1..=2))
            .await
            .expect("b 1-2");
        assert!(s.allow_source_reset("c").await.expect("confirm a"));
        assert_eq!(s.hello("c", 111).await.expect("a again").acked, 0);
        let out = s
            .append("c", 111, UNFENCED, 0, evs(1..=8))
            .await
            .expect("resend");
        assert_eq!(
            out,
            AppendOutcome::Stored {
                acked: 8,
                inserted: 3
            },
            "4, 7 and 8 are new"
        );
        let a: Vec<u64> = s
            .clinic_events("c", 0, 100)
            .await
            .expect("a")
            .iter()
            .map(|e| e.seq)
            .collect();
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (1..=8).collect::<Vec<_>>(), "each once: {a:?}");
        assert_eq!(s.clinic("c").await.expect("c").expect("c").events, 10);
    });
}

fn acknowledged_means_durable_across_a_restart(f: &Fixture) {
    block(async {
        f.store
            .append("c", 0, UNFENCED, 0, evs(1..=50))
            .await
            .expect("append");
    });
    // Nothing flushed by hand: the writer answered after COMMIT, so a new process sees it.
    f.store.close();
    let again = f.reopen();
    block(async {
        assert_eq!(again.acked_seq("c").await.expect("acked"), 50);
        assert_eq!(
            again
                .events_page(Some("c"), 0, 100)
                .await
                .expect("page")
                .len(),
            50
        );
        assert_eq!(again.hello("c", 0).await.expect("hello").acked, 50);
    });
    again.close();
}

fn counters_follow_every_write(f: &Fixture) {
    let s = &f.store;
    block(async {
        s.append("a", 0, UNFENCED, 0, evs(1..=5)).await.expect("a");
        s.append("a", 0, UNFENCED, 3, evs(4..=7))
            .await
            .expect("a again");
        s.append("b", 0, UNFENCED, 0, evs(1..=2)).await.expect("b");
        let u1 = s.enqueue_update(update("a")).await.expect("u1");
        let u2 = s.enqueue_update(update("a")).await.expect("u2");
        s.enqueue_update(update("fresh")).await.expect("u3");
        let all = s.clinics().await.expect("clinics");
        let ids: Vec<&str> = all.iter().map(|c| c.clinic_id.as_str()).collect();
        assert_eq!(ids, vec!["a", "b", "fresh"], "ordered by id");
        let a = s.clinic("a").await.expect("a").expect("known");
        assert_eq!((a.events, a.pending_updates, a.acked_seq), (7, 2, 7));
        assert!(a.last_event_at.is_some());
        // Delivered is still open; an answer closes it.
        s.mark_delivered(vec![u1.clone()]).await.expect("mark");
        assert_eq!(
            s.clinic("a").await.expect("a").expect("a").pending_updates,
            2
        );
        assert!(s
            .update_result("a", &u1, UpdateStatus::Applied, None)
            .await
            .expect("result"));
        assert_eq!(
            s.clinic("a").await.expect("a").expect("a").pending_updates,
            1
        );
        // A second answer, or another clinic's, changes nothing.
        assert!(!s
            .update_result("a", &u1, UpdateStatus::Failed, None)
            .await
            .expect("again"));
        assert_eq!(
            s.clinic("a").await.expect("a").expect("a").failed_updates,
            0
        );
        // A failed answer is counted on the clinic (the dashboard's "failed").
        assert!(s
            .update_result("a", &u2, UpdateStatus::Failed, Some("constraint".into()))
            .await
            .expect("failed"));
        let a = s.clinic("a").await.expect("a").expect("a");
        assert_eq!((a.pending_updates, a.failed_updates), (0, 1));
        let fresh = s.clinic("fresh").await.expect("f").expect("f");
        assert_eq!((fresh.events, fresh.pending_updates), (0, 1));
        assert!(s.clinic("nobody").await.expect("read").is_none());
    });
}

fn updates_lifecycle(f: &Fixture) {
    let s = &f.store;
    block(async {
        let id = s.enqueue_update(update("c")).await.expect("enqueue");
        let id2 = s.enqueue_update(update("c")).await.expect("enqueue");
        let open = s.open_updates("c", 0, 10).await.expect("open");
        assert_eq!(
            open.iter()
                .map(|(_, u)| u.update_id.clone())
                .collect::<Vec<_>>(),
            vec![id.clone(), id2.clone()]
        );
        assert_eq!(
            open[0].1.row,
            Some(
                json!({"id": 1, "name": "cloud"})
                    .as_object()
                    .cloned()
                    .unwrap_or_default()
            )
        );
        // Paging by row.
        let rest = s.open_updates("c", open[0].0, 10).await.expect("rest");
        assert_eq!(rest.len(), 1);
        assert!(s
            .open_updates("other", 0, 10)
            .await
            .expect("other")
            .is_empty());
        s.mark_delivered(vec![id.clone()]).await.expect("mark");
        let r = s.update(&id).await.expect("read").expect("exists");
        assert_eq!((r.status.as_str(), r.deliveries), ("delivered", 1));
        // Not this clinic's: refused.
        assert!(!s
            .update_result("other", &id, UpdateStatus::Applied, None)
            .await
            .expect("x"));
        assert!(s
            .update_result("c", &id, UpdateStatus::Conflict, Some("row changed".into()))
            .await
            .expect("answer"));
        let r = s.update(&id).await.expect("read").expect("exists");
        assert_eq!(
            (r.status.as_str(), r.reason.as_deref()),
            ("conflict", Some("row changed"))
        );
        assert_eq!(s.open_updates("c", 0, 10).await.expect("open").len(), 1);
        assert!(s.update("upd_none").await.expect("read").is_none());
    });
}

fn updates_are_idempotent_cancellable_and_listed_by_status(f: &Fixture) {
    let s = &f.store;
    block(async {
        let keyed = |k: &str| NewUpdate {
            idempotency_key: Some(k.into()),
            ..update("c")
        };
        // The same key, the same body: the first update, once.
        let a = s.enqueue_update(keyed("k-1")).await.expect("a");
        let again = s.enqueue_update(keyed("k-1")).await.expect("again");
        assert_eq!(a, again);
        // The same key for another clinic is another update.
        let other = s
            .enqueue_update(NewUpdate {
                clinic_id: "d".into(),
                ..keyed("k-1")
            })
            .await
            .expect("other clinic");
        assert_ne!(a, other);
        // The same key, another body: refused, nothing queued.
        let mut changed = keyed("k-1");
        changed.row = json!({"id": 1, "name": "changed"}).as_object().cloned();
        match s.enqueue_update(changed).await {
            Err(StoreError::Conflict(m)) => assert!(m.contains(&a), "{m}"),
            other => panic!("a reused key with another body: {other:?}"),
        }
        let b = s.enqueue_update(update("c")).await.expect("b");
        let c = s.enqueue_update(update("c")).await.expect("c");
        assert_eq!(
            s.clinic("c").await.expect("c").expect("c").pending_updates,
            3
        );
        // Cancel a pending one; a delivered one is too late; unknown is not found.
        assert_eq!(
            s.cancel_update(&b).await.expect("cancel"),
            CancelOutcome::Cancelled
        );
        assert_eq!(
            s.clinic("c").await.expect("c").expect("c").pending_updates,
            2
        );
        // The mark answers only what is still open: the cancelled one is never sent.
        let open = s
            .mark_delivered(vec![a.clone(), b.clone(), c.clone()])
            .await
            .expect("mark");
        assert_eq!(open, vec![a.clone(), c.clone()]);
        assert_eq!(
            s.cancel_update(&a).await.expect("cancel"),
            CancelOutcome::NotPending("delivered".into())
        );
        assert_eq!(
            s.cancel_update("upd_none").await.expect("cancel"),
            CancelOutcome::NotFound
        );
        assert!(s
            .open_updates("c", 0, 10)
            .await
            .expect("open")
            .iter()
            .all(|(_, u)| u.update_id != b));
        // Listed by status, paged by row.
        let ids = |v: Vec<(i64, tether::gateway::store::UpdateRecord)>| {
            v.into_iter().map(|(_, u)| u.update_id).collect::<Vec<_>>()
        };
        let all = s.updates_page("c", None, 0, 10).await.expect("all");
        assert_eq!(ids(all.clone()), vec![a.clone(), b.clone(), c.clone()]);
        assert_eq!(
            ids(s
                .updates_page("c", Some("cancelled".into()), 0, 10)
                .await
                .expect("cancelled")),
            vec![b.clone()]
        );
        assert_eq!(
            ids(s
                .updates_page("c", Some("delivered".into()), 0, 10)
                .await
                .expect("delivered")),
            vec![a.clone(), c.clone()]
        );
        assert_eq!(
            ids(s.updates_page("c", None, all[0].0, 1).await.expect("page")),
            vec![b.clone()]
        );
        // A retry after the first was answered still gets the first, with its status.
        assert!(s
            .update_result("c", &a, UpdateStatus::Applied, None)
            .await
            .expect("applied"));
        assert_eq!(s.enqueue_update(keyed("k-1")).await.expect("late retry"), a);
        assert_eq!(
            s.clinic("c").await.expect("c").expect("c").pending_updates,
            1
        );
    });
}

fn a_batch_is_queued_whole_and_counted_by_status(f: &Fixture) {
    let s = &f.store;
    block(async {
        let batch = |c: &str| NewUpdate {
            batch_id: Some("bat_1".into()),
            ..update(c)
        };
        let ids = s
            .enqueue_batch(vec![batch("a"), batch("b"), batch("c")])
            .await
            .expect("batch");
        assert_eq!(ids.len(), 3);
        for (c, id) in ["a", "b", "c"].iter().zip(&ids) {
            let r = s.update(id).await.expect("read").expect("queued");
            assert_eq!(r.clinic_id, *c);
        }
        assert_eq!(
            s.batch_counts("bat_1").await.expect("counts"),
            vec![("pending".to_string(), 3)]
        );
        s.mark_delivered(vec![ids[0].clone()]).await.expect("mark");
        assert!(s
            .update_result("a", &ids[0], UpdateStatus::Applied, None)
            .await
            .expect("applied"));
        assert_eq!(
            s.batch_counts("bat_1").await.expect("counts"),
            vec![("applied".to_string(), 1), ("pending".to_string(), 2)]
        );
        assert!(s.batch_counts("bat_none").await.expect("none").is_empty());
        // All or none: an update refused inside the batch (its key reused with another body)
        // leaves nothing of the batch queued.
        s.enqueue_update(NewUpdate {
            idempotency_key: Some("k".into()),
            ..update("f")
        })
        .await
        .expect("first");
        let mut clash = NewUpdate {
            idempotency_key: Some("k".into()),
            batch_id: Some("bat_2".into()),
            ..update("f")
        };
        clash.row = json!({"id": 1, "name": "other"}).as_object().cloned();
        let good = NewUpdate {
            batch_id: Some("bat_2".into()),
            ..update("e")
        };
        assert!(matches!(
            s.enqueue_batch(vec![good, clash]).await,
            Err(StoreError::Conflict(_))
        ));
        assert!(s.batch_counts("bat_2").await.expect("counts").is_empty());
        assert!(s.open_updates("e", 0, 10).await.expect("e").is_empty());
    });
}

fn webhook_cursor_and_dead_letters(f: &Fixture) {
    let s = &f.store;
    block(async {
        s.append("c", 0, UNFENCED, 0, evs(1..=5))
            .await
            .expect("append");
        let ids: Vec<u64> = s
            .events_page(None, 0, 10)
            .await
            .expect("p")
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(s.webhook_cursor("w").await.expect("cursor"), 0);
        assert!(s
            .advance_webhook_cursor("w", 0, ids[0])
            .await
            .expect("first"));
        assert!(s
            .advance_webhook_cursor("w", ids[0], ids[1])
            .await
            .expect("second"));
        // A stale move (the cursor is no longer where the mover read it) loses.
        assert!(!s
            .advance_webhook_cursor("w", ids[0], ids[2])
            .await
            .expect("stale"));
        assert_eq!(s.webhook_cursor("w").await.expect("cursor"), ids[1]);
        // Replay moves it back; past the head is refused, naming the head.
        s.replay_webhook("w", ids[0])
            .await
            .expect("replay")
            .expect("accepted");
        assert_eq!(s.webhook_cursor("w").await.expect("cursor"), ids[0] - 1);
        assert_eq!(
            s.replay_webhook("w", ids[4] + 10).await.expect("replay"),
            Err(ids[4])
        );
        // Dead letters: added (attempts add up), listed, counted, removed.
        s.add_dead_letter("w", ids[2], 3, "endpoint answered 500")
            .await
            .expect("dl");
        s.add_dead_letter("w", ids[2], 2, "endpoint answered 502")
            .await
            .expect("dl again");
        s.add_dead_letter("w", ids[3], 1, "timeout")
            .await
            .expect("dl 2");
        let list = s.dead_letters("w", 0, 10).await.expect("list");
        assert_eq!(list.len(), 2);
        assert_eq!(
            (
                list[0].event_id,
                list[0].attempts,
                list[0].last_error.as_str()
            ),
            (ids[2], 5, "endpoint answered 502")
        );
        assert_eq!(s.dead_letter_count("w").await.expect("count"), 2);
        assert_eq!(s.dead_letter_count("other").await.expect("count"), 0);
        assert_eq!(
            s.dead_letter_event("w", list[0].id).await.expect("ev"),
            Some(ids[2])
        );
        assert!(s.remove_dead_letter("w", list[0].id).await.expect("rm"));
        assert!(!s
            .remove_dead_letter("w", list[0].id)
            .await
            .expect("rm again"));
        assert_eq!(
            s.dead_letter_event("w", list[0].id).await.expect("ev"),
            None
        );
    });
}

fn retention_prunes_old_delivered_events_and_says_gone(f: &Fixture) {
    let s = &f.store;
    block(async {
        s.append("a", 0, UNFENCED, 0, evs(1..=6)).await.expect("a");
        s.append("b", 0, UNFENCED, 0, evs(1..=4)).await.expect("b");
        let ids: Vec<u64> = s
            .events_page(None, 0, 100)
            .await
            .expect("p")
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(ids.len(), 10);
        // Nothing is older than a cutoff in the past.
        let none = s
            .prune("2000-01-01T00:00:00.000Z", u64::MAX / 2, 100)
            .await
            .expect("prune");
        assert_eq!(none.events, 0);
        // Everything is older than a cutoff in the future, but a webhook holds back ids[3]..:
        // batches of 2, oldest first.
        let future = "2999-01-01T00:00:00.000Z";
        let p = s.prune(future, ids[3], 2).await.expect("prune");
        assert_eq!((p.events, p.pruned_through), (2, ids[1]));
        let p = s.prune(future, ids[3], 2).await.expect("prune");
        assert_eq!((p.events, p.pruned_through), (1, ids[2]));
        let p = s.prune(future, ids[3], 2).await.expect("prune");
        assert_eq!(p.events, 0, "never past an undelivered event");
        // Counters follow; a cursor before the kept history is Gone with the oldest id.
        assert_eq!(s.clinic("a").await.expect("a").expect("a").events, 3);
        match s.events_page(None, 0, 10).await {
            Err(StoreError::Gone {
                pruned_through,
                oldest,
            }) => {
                assert_eq!((pruned_through, oldest), (ids[2], ids[3]))
            }
            other => panic!("expected Gone, got {other:?}"),
        }
        let kept = s
            .events_page(None, ids[2], 100)
            .await
            .expect("from the oldest");
        assert_eq!(kept.len(), 7);
        assert_eq!(
            s.acked_seq("a").await.expect("acked"),
            6,
            "positions are not retention's"
        );
    });
}

fn the_replay_guard_remembers_token_ids_until_they_expire(f: &Fixture) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let s = &f.store;
    block(async {
        assert!(s.remember_token("jti-1", now + 300).await.expect("first"));
        assert!(!s.remember_token("jti-1", now + 300).await.expect("replay"));
        // A second node on the same data sees the same ids.
        let other = f.reopen();
        assert!(!other
            .remember_token("jti-1", now + 300)
            .await
            .expect("at node 2"));
        assert!(other
            .remember_token("jti-2", now + 300)
            .await
            .expect("new at node 2"));
        other.close();
        // Long expired ids are purged (a later call clears them), so the table stays small.
        assert!(s.remember_token("old", now - 7_200).await.expect("old"));
        assert!(s.remember_token("jti-3", now + 300).await.expect("purges"));
        assert!(s
            .remember_token("old", now - 7_200)
            .await
            .expect("purged, so new again"));
        assert!(!s
            .remember_token("jti-1", now + 300)
            .await
            .expect("live ids stay"));
    });
}

fn enrolment_codes_work_once_on_every_node(f: &Fixture) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let code = |hash: &str, clinic: &str, expires_at: u64| NewEnrolmentCode {
        code_hash: hash.into(),
        clinic_id: clinic.into(),
        labels_json: r#"{"region":"north"}"#.into(),
        expires_at,
        created_by: "ops".into(),
    };
    let s = &f.store;
    block(async {
        s.add_enrolment_code(code("h1", "clinic-a", now + 600))
            .await
            .expect("add h1");
        s.add_enrolment_code(code("h2", "clinic-b", now - 1))
            .await
            .expect("add an expired one");
        // A code never seen: unknown, and nothing is created by asking.
        assert_eq!(
            s.take_enrolment_code("nope", "10.0.0.9")
                .await
                .expect("take"),
            CodeTake::Unknown
        );
        // Bound to its clinic, with its labels.
        assert_eq!(
            s.take_enrolment_code("h1", "10.0.0.1").await.expect("take"),
            CodeTake::Taken {
                clinic_id: "clinic-a".into(),
                labels_json: r#"{"region":"north"}"#.into()
            }
        );
        // Once: again on this node, and on another node of the same store.
        match s
            .take_enrolment_code("h1", "10.0.0.2")
            .await
            .expect("again")
        {
            CodeTake::Used { by, at } => {
                assert_eq!(by, "10.0.0.1");
                assert!(!at.is_empty());
            }
            other => panic!("a used code was taken again: {other:?}"),
        }
        let other = f.reopen();
        assert!(matches!(
            other
                .take_enrolment_code("h1", "10.0.0.3")
                .await
                .expect("node 2"),
            CodeTake::Used { .. }
        ));
        // Given back after a failure on the gateway's side: usable once more.
        s.return_enrolment_code("h1").await.expect("return");
        assert!(matches!(
            other
                .take_enrolment_code("h1", "10.0.0.3")
                .await
                .expect("node 2 after return"),
            CodeTake::Taken { .. }
        ));
        other.close();
        // Expired: refused, and naming its clinic (for the audit line).
        assert_eq!(
            s.take_enrolment_code("h2", "10.0.0.1")
                .await
                .expect("expired"),
            CodeTake::Expired {
                clinic_id: "clinic-b".into()
            }
        );
        // The same hash twice is refused (a code is created once).
        assert!(s
            .add_enrolment_code(code("h1", "clinic-c", now + 600))
            .await
            .is_err());
        // Listed without the code, newest first; withdrawing takes only unused ones.
        let listed = s.enrolment_codes("clinic-a").await.expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].hash_prefix, "h1");
        assert_eq!(listed[0].created_by, "ops");
        assert_eq!(listed[0].used_by.as_deref(), Some("10.0.0.3"));
        s.add_enrolment_code(code("h4", "clinic-a", now + 600))
            .await
            .expect("add h4");
        assert_eq!(s.enrolment_codes("clinic-a").await.expect("list").len(), 2);
        assert_eq!(
            s.withdraw_enrolment_codes("clinic-a")
                .await
                .expect("withdraw"),
            1
        );
        assert_eq!(
            s.take_enrolment_code("h4", "10.0.0.1")
                .await
                .expect("withdrawn"),
            CodeTake::Unknown
        );
        assert_eq!(s.enrolment_codes("clinic-a").await.expect("list").len(), 1);
        // Codes long expired are purged by the next add.
        s.add_enrolment_code(code("old", "clinic-d", now - 8 * 24 * 3600))
            .await
            .expect("add old");
        s.add_enrolment_code(code("h3", "clinic-e", now + 600))
            .await
            .expect("add purges");
        assert_eq!(
            s.take_enrolment_code("old", "10.0.0.1")
                .await
                .expect("purged"),
            CodeTake::Unknown
        );
    });
}

fn the_registry_is_kept_versioned_and_every_node_hears_of_changes(f: &Fixture) {
    let (a, b) = (f.node("node-a"), f.node("node-b"));
    let (tx, rx) = std::sync::mpsc::channel::<u64>();
    let across = a.watch(Box::new(move |signal: Signal| match signal {
        Signal::Registry(v) => tx.send(v).is_ok(),
        _ => true,
    }));
    block(async {
        let (v0, rows) = a.registry_entries().await.expect("empty registry");
        assert!(rows.is_empty());
        assert_eq!(a.registry_version().await.expect("version"), v0);
        let v1 = b
            .put_registry_entry("clinic-1", r#"{"clinic_id":"clinic-1","keys":[]}"#)
            .await
            .expect("put");
        assert!(v1 > v0);
        let v2 = b
            .put_registry_entry("clinic-1", r#"{"clinic_id":"clinic-1","keys":[1]}"#)
            .await
            .expect("replace");
        assert!(v2 > v1);
        b.put_registry_entry("clinic-2", "{}").await.expect("put 2");
        // Node a reads what node b wrote, in clinic order, at b's version.
        let (v, rows) = a.registry_entries().await.expect("entries");
        assert_eq!(v, a.registry_version().await.expect("version"));
        assert_eq!(
            rows,
            vec![
                (
                    "clinic-1".to_string(),
                    r#"{"clinic_id":"clinic-1","keys":[1]}"#.to_string()
                ),
                ("clinic-2".to_string(), "{}".to_string())
            ]
        );
        let v3 = a
            .delete_registry_entry("clinic-2")
            .await
            .expect("delete")
            .expect("was there");
        assert!(v3 > v);
        assert_eq!(
            a.delete_registry_entry("clinic-2").await.expect("again"),
            None,
            "nothing to delete: no new version"
        );
        assert_eq!(b.registry_version().await.expect("version"), v3);
        assert_eq!(b.registry_entries().await.expect("entries").1.len(), 1);
    });
    match a.kind() {
        "sqlite" => assert!(!across, "SQLite has only its own process to tell"),
        _ => {
            assert!(across);
            // The listener connects in the background: write until a change is heard.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
            let heard = loop {
                let v = store::wait(b.put_registry_entry("clinic-3", "{}")).expect("put on b");
                if let Ok(h) = rx.recv_timeout(std::time::Duration::from_millis(300)) {
                    break (h, v);
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "no notification within 15 s"
                );
            };
            assert!(heard.0 <= heard.1, "{heard:?}");
            let v = store::wait(b.delete_registry_entry("clinic-3"))
                .expect("delete")
                .expect("was there");
            // Notifications of the writes above may still be arriving: older versions first.
            loop {
                let next = rx
                    .recv_timeout(std::time::Duration::from_secs(10))
                    .expect("the delete is heard");
                if next == v {
                    break;
                }
                assert!(next < v, "heard version {next} after {v}");
            }
        }
    }
    a.close();
    b.close();
}

fn channel(
    id: &str,
    clinic: &str,
    name: &str,
    up: bool,
    expires_ms: Option<u64>,
) -> NewChannelMessage {
    NewChannelMessage {
        message_id: id.into(),
        clinic_id: clinic.into(),
        channel: name.into(),
        up,
        durable: expires_ms.is_none(),
        payload: format!(r#"{{"n":"{id}"}}"#),
        expires_ms,
        batch_id: None,
    }
}

/// Channel messages: down ones kept in order until the clinic's agent answers (a sent one is
/// sent again by the next session), transient ones never read past their time and expired once
/// across nodes, up ones deduplicated per clinic and id and read in order; finished ones purged.
/// PostgreSQL signals a down message to the node holding its clinic, an up one to every node.
fn channel_messages_are_kept_delivered_expired_and_streamed(f: &Fixture) {
    let (a, b) = (f.node("node-a"), f.node("node-b"));
    let (tx, rx) = std::sync::mpsc::channel::<Signal>();
    let across = a.watch(Box::new(move |signal: Signal| match signal {
        Signal::Updates(_) | Signal::UpChannel => tx.send(signal).is_ok(),
        _ => true,
    }));
    let now = tether::security::unix_now_ms();
    block(async {
        let new = b
            .enqueue_channel(vec![
                channel("m1", "c1", "notice", false, None),
                channel("m2", "c1", "voip.call", false, Some(now + 60_000)),
                channel("m3", "c1", "voip.call", false, Some(now.saturating_sub(1))),
                channel("m4", "c2", "notice", false, None),
            ])
            .await
            .expect("enqueue");
        assert_eq!(new, [true, true, true, true]);
        // c1's open messages, in order, with payloads; the expired one is never read.
        let open = a.open_channel("c1", 0, now, 10).await.expect("open");
        let ids: Vec<&str> = open.iter().map(|r| r.message_id.as_str()).collect();
        assert_eq!(ids, ["m1", "m2"]);
        assert_eq!(open[0].payload.as_deref(), Some(r#"{"n":"m1"}"#));
        assert_eq!(open[0].delivery, "durable");
        assert_eq!(open[1].expires_ms, Some(now + 60_000));
        assert!(open[0].row < open[1].row);
        let later = a
            .open_channel("c1", open[0].row, now, 10)
            .await
            .expect("after");
        assert_eq!(later.len(), 1, "paged after the first row");
        // Handed to a session; answered once, by its own clinic only.
        let sent = a
            .mark_channel_sent(vec!["m1".into(), "m2".into(), "nope".into()])
            .await
            .expect("sent");
        assert_eq!(sent, ["m1", "m2"]);
        let r = b
            .channel_message("m1", None)
            .await
            .expect("read")
            .expect("m1");
        assert_eq!(
            (r.status.as_str(), r.deliveries, r.direction.as_str()),
            ("sent", 1, "down")
        );
        assert!(r.payload.is_none(), "a status read carries no payload");
        let m1_created = r.created_ms;
        let wrong = a.channel_result("c2", "m1", "delivered").await;
        assert_eq!(wrong.expect("wrong clinic"), None);
        let (name, created) = a
            .channel_result("c1", "m1", "delivered")
            .await
            .expect("delivered")
            .expect("recorded");
        assert_eq!((name.as_str(), created), ("notice", m1_created));
        let twice = b.channel_result("c1", "m1", "delivered").await;
        assert_eq!(twice.expect("twice"), None, "an answer counts once");
        // Sent but not answered: the next session reads it again.
        let open = b.open_channel("c1", 0, now, 10).await.expect("open");
        assert_eq!(
            open.iter()
                .map(|r| r.message_id.as_str())
                .collect::<Vec<_>>(),
            ["m2"]
        );
        let pending = a.channel_pending_clinics().await.expect("pending");
        assert_eq!(pending, ["c1", "c2"]);
        // Expiry: counted once whichever node runs it.
        let counts = a.expire_channels(now, 0).await.expect("expire");
        assert_eq!(counts, [("voip.call".to_string(), 1)]);
        assert!(b.expire_channels(now, 0).await.expect("again").is_empty());
        let r = a
            .channel_message("m3", None)
            .await
            .expect("read")
            .expect("m3");
        assert_eq!(r.status, "expired");
        // Up: one message per clinic and id (a resend is no duplicate), read in order.
        let new = a
            .enqueue_channel(vec![
                channel("u1", "c1", "frontdesk.checkin", true, None),
                channel("u1", "c2", "frontdesk.checkin", true, None),
            ])
            .await
            .expect("up");
        assert_eq!(new, [true, true]);
        let again = b
            .enqueue_channel(vec![channel("u1", "c1", "frontdesk.checkin", true, None)])
            .await
            .expect("resend");
        assert_eq!(again, [false]);
        let page = b.up_channel_page(0, 10).await.expect("page");
        let got: Vec<(&str, &str)> = page
            .iter()
            .map(|r| (r.clinic_id.as_str(), r.message_id.as_str()))
            .collect();
        assert_eq!(got, [("c1", "u1"), ("c2", "u1")]);
        assert_eq!(page[0].status, "accepted");
        assert_eq!(page[0].payload.as_deref(), Some(r#"{"n":"u1"}"#));
        assert!(b
            .up_channel_page(page[1].row, 10)
            .await
            .expect("after")
            .is_empty());
        let by_clinic = a
            .channel_message("u1", Some("c2"))
            .await
            .expect("read")
            .expect("u1");
        assert_eq!(by_clinic.clinic_id, "c2");
        // Purge: finished messages older than the cut go; open ones stay.
        a.expire_channels(now, now + 3_600_000)
            .await
            .expect("purge");
        assert!(a.channel_message("m1", None).await.expect("read").is_none());
        assert!(a
            .channel_message("u1", Some("c1"))
            .await
            .expect("read")
            .is_none());
        assert!(
            a.channel_message("m2", None).await.expect("read").is_some(),
            "still open"
        );
    });
    match a.kind() {
        "sqlite" => assert!(!across, "SQLite has only its own process to tell"),
        _ => {
            assert!(across);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
            let mut n = 0;
            loop {
                n += 1;
                let id = format!("s{n}");
                store::wait(b.enqueue_channel(vec![channel(&id, "c9", "notice", false, None)]))
                    .expect("enqueue on b");
                // Signals of the writes above may come first (the listener may be up already).
                if let Ok(Signal::Updates(c)) =
                    rx.recv_timeout(std::time::Duration::from_millis(300))
                {
                    if c == "c9" {
                        break;
                    }
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "no notification within 15 s"
                );
            }
            store::wait(b.enqueue_channel(vec![channel(
                "up-x",
                "c9",
                "frontdesk.checkin",
                true,
                None,
            )]))
            .expect("up on b");
            loop {
                match rx.recv_timeout(std::time::Duration::from_secs(10)) {
                    Ok(Signal::UpChannel) => break,
                    Ok(_) => continue,
                    Err(e) => panic!("the up message was not signalled: {e}"),
                }
            }
        }
    }
    a.close();
    b.close();
}

fn the_writer_answers_a_readiness_round_trip(f: &Fixture) {
    block(async {
        f.store.check_writer().await.expect("writer commits");
    });
    f.store.close();
    let after = block(f.store.check_writer());
    assert_eq!(after, Err(StoreError::Stopped));
}

fn concurrent_writers_never_let_a_reader_skip_an_event(f: &Fixture) {
    // Two stores on the same data (two gateway nodes) append concurrently while a reader pages
    // with `after = last id seen`, as a webhook dispatcher and `GET /v1/events` do. Every
    // event must be seen exactly once: an id committed after a larger one would be skipped.
    let second = f.reopen();
    let writers: Vec<(Arc<Store>, &str)> = vec![(f.store.clone(), "n1"), (second.clone(), "n2")];
    let per_clinic = 400u64;
    let clinics_per_node = 4;
    let reader_store = f.store.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_r = stop.clone();
    let reader = std::thread::spawn(move || {
        let mut seen: Vec<(String, u64)> = Vec::new();
        let mut after = 0;
        loop {
            let done = stop_r.load(std::sync::atomic::Ordering::SeqCst);
            let page = store::wait(reader_store.events_page(None, after, 97)).expect("page");
            if let Some(last) = page.last() {
                after = last.id;
            }
            let empty = page.is_empty();
            seen.extend(page.into_iter().map(|e| (e.clinic_id, e.seq)));
            if done && empty {
                return seen;
            }
        }
    });
    let mut threads = Vec::new();
    for (s, node) in writers {
        for k in 0..clinics_per_node {
            let s = s.clone();
            let clinic = format!("{node}-c{k}");
            threads.push(std::thread::spawn(move || {
                let mut prev = 0;
                while prev < per_clinic {
                    let n = 1 + rand::random::<u64>() % 7;
                    let batch = evs(prev + 1..=(prev + n).min(per_clinic));
                    let out =
                        store::wait(s.append(&clinic, 0, UNFENCED, prev, batch)).expect("append");
                    match out {
                        AppendOutcome::Stored { acked, .. } => prev = acked,
                        other => panic!("unexpected {other:?}"),
                    }
                }
            }));
        }
    }
    for t in threads {
        t.join().expect("writer");
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let seen = reader.join().expect("reader");
    let total = per_clinic as usize * clinics_per_node * 2;
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "an event was read twice");
    assert_eq!(
        seen.len(),
        total,
        "the reader skipped events that committed late"
    );
    second.close();
}

fn a_newer_schema_is_refused_by_name(f: &Fixture) {
    f.store.close();
    match &f.location {
        StoreLocation::Sqlite(path) => {
            let c = rusqlite::Connection::open(path).expect("open");
            c.execute_batch("PRAGMA user_version = 99").expect("bump");
        }
        StoreLocation::Postgres { schema, .. } => {
            let mut c = ::postgres::Client::connect(&pg_url(), ::postgres::NoTls).expect("connect");
            c.batch_execute(&format!(
                "INSERT INTO {schema}.tether_schema_migrations (version, applied_at) VALUES (99, 'future')"
            ))
            .expect("bump");
        }
    }
    let mut s = StoreSettings::sqlite("unused");
    s.location = f.location.clone();
    match store::open(&s) {
        Err(e @ StoreError::TooNew { found: 99, .. }) => {
            assert!(e.to_string().contains("newer than this binary"), "{e}")
        }
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a store newer than the binary was opened"),
    }
}

fn a_full_writer_queue_refuses_at_once(f: &Fixture) {
    let mut s = StoreSettings::sqlite("unused");
    s.location = f.location.clone();
    s.queue = 1;
    s.group_commit_max_events = 1;
    let small = store::open(&s).expect("open");
    // Queue far more than fits without waiting: some are refused, retryable, nothing blocks.
    let futs: Vec<_> = (0..200u64)
        .map(|i| small.append(&format!("q{i}"), 0, UNFENCED, 0, evs(1..=1)))
        .collect();
    let results: Vec<_> = futs.into_iter().map(store::wait).collect();
    let busy = results
        .iter()
        .filter(|r| {
            matches!(
                r,
                Err(StoreError::Unavailable {
                    retryable: true,
                    ..
                })
            )
        })
        .count();
    let stored = results.iter().filter(|r| r.is_ok()).count();
    assert!(busy > 0, "a bounded queue must refuse when full");
    assert_eq!(busy + stored, 200, "{results:?}");
    // What was accepted is stored; what was refused is not.
    let held = store::wait(small.clinics()).expect("clinics").len();
    assert_eq!(held, stored);
    small.close();
}

/// One owner per clinic: a newer claim (another node's hello) fences the older session's
/// appends, which store nothing; the newer one goes on from the acknowledged position, and the
/// clinic's record names the node holding it.
fn a_newer_claim_fences_the_older_session(f: &Fixture) {
    let (a, b) = (f.node("node-a"), f.node("node-b"));
    block(async {
        let first = a.hello("c", 7).await.expect("hello a");
        assert_eq!(first.acked, 0);
        assert!(first.epoch > 0, "a claim has an epoch: {first:?}");
        let out = a
            .append("c", 7, first.epoch, 0, evs(1..=3))
            .await
            .expect("a 1-3");
        assert_eq!(
            out,
            AppendOutcome::Stored {
                acked: 3,
                inserted: 3
            }
        );
        let held = a.clinic("c").await.expect("clinic").expect("record");
        assert_eq!(
            (held.node.as_deref(), held.epoch),
            (Some("node-a"), first.epoch)
        );

        // The clinic moves to node b (node a was paused, or its link half-open).
        let second = b.hello("c", 7).await.expect("hello b");
        assert_eq!(second.acked, 3);
        assert!(second.epoch > first.epoch, "{second:?} after {first:?}");
        // Node a wakes up and writes what it had: fenced, nothing stored.
        let late = a
            .append("c", 7, first.epoch, 3, evs(4..=6))
            .await
            .expect("a late");
        assert_eq!(
            late,
            AppendOutcome::Fenced {
                epoch: second.epoch
            }
        );
        assert_eq!(b.acked_seq("c").await.expect("acked"), 3);
        assert_eq!(b.clinic_events("c", 0, 100).await.expect("events").len(), 3);
        // Node b's session goes on from there.
        let out = b
            .append("c", 7, second.epoch, 3, evs(4..=5))
            .await
            .expect("b 4-5");
        assert_eq!(
            out,
            AppendOutcome::Stored {
                acked: 5,
                inserted: 2
            }
        );
        let rec = a.clinic("c").await.expect("clinic").expect("record");
        assert_eq!(
            (rec.node.as_deref(), rec.epoch),
            (Some("node-b"), second.epoch)
        );
        let listed = a.clinics().await.expect("clinics");
        assert_eq!(listed[0].node.as_deref(), Some("node-b"));

        // Claims keep moving: the clinic back on node a fences node b.
        let third = a.hello("c", 7).await.expect("hello a again");
        assert!(third.epoch > second.epoch);
        let fenced = b
            .append("c", 7, second.epoch, 5, evs(6..=6))
            .await
            .expect("b fenced");
        assert_eq!(fenced, AppendOutcome::Fenced { epoch: third.epoch });
        let seqs: Vec<u64> = b
            .clinic_events("c", 0, 100)
            .await
            .expect("events")
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    });
    a.close();
    b.close();
}

/// Two nodes claiming the same new clinic at the same moment get different epochs (the second
/// claim fences the first), however their transactions interleave.
fn simultaneous_claims_get_distinct_epochs(f: &Fixture) {
    let nodes: Vec<Arc<Store>> = (0..4).map(|i| f.node(&format!("node-{i}"))).collect();
    for round in 0..5 {
        let clinic = format!("new-{round}");
        let barrier = Arc::new(std::sync::Barrier::new(nodes.len()));
        let claims: Vec<u64> = nodes
            .iter()
            .map(|s| {
                let (s, clinic, barrier) = (s.clone(), clinic.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    store::wait(s.hello(&clinic, 9)).expect("hello").epoch
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().expect("claim"))
            .collect();
        let mut sorted = claims.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(
            sorted.len(),
            nodes.len(),
            "round {round}: epochs {claims:?}"
        );
        // Exactly one claim (the newest) may write.
        let mut stored = 0;
        for (s, epoch) in nodes.iter().zip(&claims) {
            match store::wait(s.append(&clinic, 9, *epoch, 0, evs(1..=1))).expect("append") {
                AppendOutcome::Stored { .. } => stored += 1,
                AppendOutcome::Fenced { epoch: now } => assert_eq!(now, sorted[sorted.len() - 1]),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(stored, 1, "round {round}");
    }
    for s in nodes {
        s.close();
    }
}

/// A session that ends releases its claim, unless a newer one has taken the clinic since.
fn an_ended_session_releases_only_its_own_claim(f: &Fixture) {
    let (a, b) = (f.node("node-a"), f.node("node-b"));
    block(async {
        let old = a.hello("c", 1).await.expect("hello a");
        let new = b.hello("c", 1).await.expect("hello b");
        a.release("c", old.epoch).await.expect("release old");
        let rec = b.clinic("c").await.expect("clinic").expect("record");
        assert_eq!(
            rec.node.as_deref(),
            Some("node-b"),
            "an old release leaves the new owner"
        );
        b.release("c", new.epoch).await.expect("release new");
        let rec = b.clinic("c").await.expect("clinic").expect("record");
        assert_eq!((rec.node, rec.epoch), (None, new.epoch));
    });
    a.close();
    b.close();
}

/// An update committed on one node is signalled to the others (PostgreSQL: NOTIFY in the
/// enqueue transaction); SQLite says it has no one else to tell.
fn committed_updates_are_signalled_to_every_node(f: &Fixture) {
    let (a, b) = (f.node("node-a"), f.node("node-b"));
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let across = a.watch(Box::new(move |signal: Signal| match signal {
        Signal::Updates(clinic) => tx.send(clinic).is_ok(),
        other => panic!("node a was sent {other:?}"),
    }));
    match a.kind() {
        "sqlite" => assert!(!across, "SQLite has only its own process to tell"),
        _ => {
            assert!(across, "{} signals across nodes", a.kind());
            // The listener connects in the background: queue until one is heard.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
            let heard = loop {
                store::wait(b.enqueue_update(update("far-away"))).expect("enqueue on b");
                if let Ok(c) = rx.recv_timeout(std::time::Duration::from_millis(300)) {
                    break c;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "no notification within 15 s"
                );
            };
            assert_eq!(heard, "far-away");
            // Once listening, each commit is heard, and only committed ones.
            while rx.try_recv().is_ok() {}
            store::wait(b.enqueue_update(update("second"))).expect("enqueue");
            let next = rx
                .recv_timeout(std::time::Duration::from_secs(10))
                .expect("second notification");
            assert_eq!(next, "second");
        }
    }
    a.close();
    b.close();
}

/// A REST call forwarded from one node to the node holding the clinic: taken once, only by the
/// node it is for; its answer goes back to the forwarding node, which removes the call with it;
/// a call whose caller gave up is gone. PostgreSQL signals each step to the node concerned.
fn forwarded_calls_are_taken_once_and_answered_back(f: &Fixture) {
    let (a, b, c) = (f.node("node-a"), f.node("node-b"), f.node("node-c"));
    let (tx_a, rx_a) = std::sync::mpsc::channel::<Signal>();
    let (tx_b, rx_b) = std::sync::mpsc::channel::<Signal>();
    let across = a.watch(Box::new(move |s: Signal| tx_a.send(s).is_ok()))
        & b.watch(Box::new(move |s: Signal| tx_b.send(s).is_ok()));
    let deadline_ms = tether::security::unix_now_ms() + 10_000;
    let call = |id: &str| ForwardedCall {
        id: id.into(),
        clinic_id: "clinic-x".into(),
        from_node: "node-a".into(),
        to_node: "node-b".into(),
        name: "appointments_today".into(),
        params: serde_json::json!({"room": 3})
            .as_object()
            .cloned()
            .unwrap_or_default(),
        deadline_ms,
    };
    // Waits for `want` on `rx`, ignoring update signals (PostgreSQL's listener connects in the
    // background: the first call is resent until node b hears one).
    let expect = |rx: &std::sync::mpsc::Receiver<Signal>, want: &Signal| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(s) if &s == want => return,
                Ok(Signal::Updates(_)) => continue,
                Ok(other) => panic!("expected {want:?}, got {other:?}"),
                Err(_) => panic!("no {want:?} within 10 s"),
            }
        }
    };
    block(async {
        if across {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
            let mut n = 0;
            loop {
                let id = format!("rpc_warmup{n}");
                a.forward_call(call(&id)).await.expect("forward");
                if let Ok(Signal::Call(heard)) =
                    rx_b.recv_timeout(std::time::Duration::from_millis(300))
                {
                    assert_eq!(heard, id);
                    break;
                }
                assert!(std::time::Instant::now() < deadline, "node b heard no call");
                n += 1;
            }
            while rx_b.try_recv().is_ok() {}
        }
        a.forward_call(call("rpc_1")).await.expect("forward");
        if across {
            expect(&rx_b, &Signal::Call("rpc_1".into()));
        }
        assert_eq!(
            c.take_call("rpc_1").await.expect("take on c"),
            None,
            "only the node the call is for takes it"
        );
        let taken = b.take_call("rpc_1").await.expect("take").expect("the call");
        assert_eq!(taken, call("rpc_1"), "the call as forwarded");
        assert_eq!(
            b.take_call("rpc_1").await.expect("again"),
            None,
            "taken once"
        );
        assert_eq!(
            a.call_answer("rpc_1").await.expect("early"),
            None,
            "no answer yet"
        );
        assert!(b
            .answer_call("rpc_1", r#"{"outcome":"timed_out"}"#)
            .await
            .expect("answer"));
        if across {
            expect(&rx_a, &Signal::Answer("rpc_1".into()));
        }
        assert_eq!(
            a.call_answer("rpc_1").await.expect("answer").as_deref(),
            Some(r#"{"outcome":"timed_out"}"#)
        );
        assert_eq!(
            a.call_answer("rpc_1").await.expect("gone"),
            None,
            "removed with its answer"
        );
        // A caller that gave up: the holder's answer finds nothing.
        a.forward_call(call("rpc_2")).await.expect("forward");
        b.take_call("rpc_2").await.expect("take").expect("the call");
        a.drop_call("rpc_2").await.expect("drop");
        assert!(
            !b.answer_call("rpc_2", "{}").await.expect("answer"),
            "the call is gone"
        );
    });
    match a.kind() {
        "sqlite" => assert!(!across, "SQLite has only its own process to tell"),
        _ => assert!(across, "{} signals across nodes", a.kind()),
    }
    for s in [a, b, c] {
        s.close();
    }
}

/// One leader per role across nodes, taken over when the leader's store goes away.
fn one_node_leads_a_role_and_another_takes_over(f: &Fixture) {
    let (a, b) = (f.node("node-a"), f.node("node-b"));
    let lead = |s: &Arc<Store>, role: &str| store::wait(s.try_lead(role)).expect("try_lead");
    assert!(lead(&a, "webhook:main"), "the first to ask leads");
    assert!(lead(&a, "webhook:main"), "and keeps leading");
    match a.kind() {
        "sqlite" => assert!(
            lead(&b, "webhook:main"),
            "one process per SQLite store leads all"
        ),
        _ => {
            assert!(!lead(&b, "webhook:main"), "a second node stands by");
            assert!(lead(&b, "webhook:other"), "roles are independent");
            // Node a goes away: its session ends and node b takes over.
            a.close();
            drop(a);
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !lead(&b, "webhook:main") {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no takeover within 10 s"
                );
                std::thread::park_timeout(std::time::Duration::from_millis(50));
            }
            let c = f.node("node-c");
            assert!(!lead(&c, "webhook:main"), "the new leader keeps it");
            c.close();
        }
    }
    b.close();
}

/// Every node's heartbeat is one row, updated in place; all nodes see all rows.
fn nodes_beat_into_one_table(f: &Fixture) {
    let (a, b) = (f.node("node-a"), f.node("node-b"));
    block(async {
        a.node_beat("10.0.0.1:8443", "2026-12-02T00:00:00.000Z", 3)
            .await
            .expect("beat a");
        b.node_beat("10.0.0.2:8443", "2026-12-02T00:00:01.000Z", 0)
            .await
            .expect("beat b");
        let first = b.nodes().await.expect("nodes");
        assert_eq!(
            first
                .iter()
                .map(|n| (n.node_id.as_str(), n.sessions))
                .collect::<Vec<_>>(),
            vec![("node-a", 3), ("node-b", 0)]
        );
        a.node_beat("10.0.0.1:8443", "2026-12-02T00:00:00.000Z", 7)
            .await
            .expect("beat a again");
        let again = b.nodes().await.expect("nodes");
        assert_eq!(again.len(), 2);
        assert_eq!(again[0].sessions, 7);
        assert!(again[0].last_beat_ms >= first[0].last_beat_ms);
        assert_eq!(again[0].addr, "10.0.0.1:8443");
    });
    a.close();
    b.close();
}

macro_rules! contract {
    ($adapter:ident) => {
        mod $adapter {
            use super::*;
            #[test]
            fn append_duplicates_and_gaps() {
                super::append_duplicates_and_gaps(&Fixture::$adapter());
            }
            #[test]
            fn large_batches_store_every_event_once_in_order() {
                super::large_batches_store_every_event_once_in_order(&Fixture::$adapter());
            }
            #[test]
            fn flagged_events_are_stored_with_their_problem() {
                super::flagged_events_are_stored_with_their_problem(&Fixture::$adapter());
            }
            #[test]
            fn a_recreated_outbox_starts_a_new_position() {
                super::a_recreated_outbox_starts_a_new_position(&Fixture::$adapter());
            }
            #[test]
            fn an_outbox_that_comes_back_resends_without_duplicates_or_holes() {
                super::an_outbox_that_comes_back_resends_without_duplicates_or_holes(
                    &Fixture::$adapter(),
                );
            }
            #[test]
            fn acknowledged_means_durable_across_a_restart() {
                super::acknowledged_means_durable_across_a_restart(&Fixture::$adapter());
            }
            #[test]
            fn counters_follow_every_write() {
                super::counters_follow_every_write(&Fixture::$adapter());
            }
            #[test]
            fn updates_lifecycle() {
                super::updates_lifecycle(&Fixture::$adapter());
            }
            #[test]
            fn a_batch_is_queued_whole_and_counted_by_status() {
                super::a_batch_is_queued_whole_and_counted_by_status(&Fixture::$adapter());
            }
            #[test]
            fn updates_are_idempotent_cancellable_and_listed_by_status() {
                super::updates_are_idempotent_cancellable_and_listed_by_status(&Fixture::$adapter());
            }
            #[test]
            fn webhook_cursor_and_dead_letters() {
                super::webhook_cursor_and_dead_letters(&Fixture::$adapter());
            }
            #[test]
            fn retention_prunes_old_delivered_events_and_says_gone() {
                super::retention_prunes_old_delivered_events_and_says_gone(&Fixture::$adapter());
            }
            #[test]
            fn the_replay_guard_remembers_token_ids_until_they_expire() {
                super::the_replay_guard_remembers_token_ids_until_they_expire(&Fixture::$adapter());
            }
            #[test]
            fn enrolment_codes_work_once_on_every_node() {
                super::enrolment_codes_work_once_on_every_node(&Fixture::$adapter());
            }
            #[test]
            fn the_registry_is_kept_versioned_and_every_node_hears_of_changes() {
                super::the_registry_is_kept_versioned_and_every_node_hears_of_changes(
                    &Fixture::$adapter(),
                );
            }
            #[test]
            fn channel_messages_are_kept_delivered_expired_and_streamed() {
                super::channel_messages_are_kept_delivered_expired_and_streamed(
                    &Fixture::$adapter(),
                );
            }
            #[test]
            fn the_writer_answers_a_readiness_round_trip() {
                super::the_writer_answers_a_readiness_round_trip(&Fixture::$adapter());
            }
            #[test]
            fn concurrent_writers_never_let_a_reader_skip_an_event() {
                super::concurrent_writers_never_let_a_reader_skip_an_event(&Fixture::$adapter());
            }
            #[test]
            fn a_newer_schema_is_refused_by_name() {
                super::a_newer_schema_is_refused_by_name(&Fixture::$adapter());
            }
            #[test]
            fn a_newer_claim_fences_the_older_session() {
                super::a_newer_claim_fences_the_older_session(&Fixture::$adapter());
            }
            #[test]
            fn simultaneous_claims_get_distinct_epochs() {
                super::simultaneous_claims_get_distinct_epochs(&Fixture::$adapter());
            }
            #[test]
            fn an_ended_session_releases_only_its_own_claim() {
                super::an_ended_session_releases_only_its_own_claim(&Fixture::$adapter());
            }
            #[test]
            fn committed_updates_are_signalled_to_every_node() {
                super::committed_updates_are_signalled_to_every_node(&Fixture::$adapter());
            }
            #[test]
            fn forwarded_calls_are_taken_once_and_answered_back() {
                super::forwarded_calls_are_taken_once_and_answered_back(&Fixture::$adapter());
            }
            #[test]
            fn one_node_leads_a_role_and_another_takes_over() {
                super::one_node_leads_a_role_and_another_takes_over(&Fixture::$adapter());
            }
            #[test]
            fn nodes_beat_into_one_table() {
                super::nodes_beat_into_one_table(&Fixture::$adapter());
            }
            #[test]
            fn a_full_writer_queue_refuses_at_once() {
                super::a_full_writer_queue_refuses_at_once(&Fixture::$adapter());
            }
        }
    };
}

contract!(sqlite);
#[cfg(feature = "postgres")]
contract!(postgres);

/// The whole stack on the PostgreSQL store: agents sync through a gateway whose store is
/// PostgreSQL (started inside actix's runtime, as in production), every committed change arrives
/// once and in order, a cloud update is applied once, and the node reports ready.
#[cfg(feature = "postgres")]
#[actix_rt::test]
async fn a_fleet_syncs_through_a_gateway_on_the_postgresql_store() {
    use common::*;
    use std::time::Duration;
    let dir = tempfile::tempdir().expect("tempdir");
    let schema = format!("fleet_{}_{:x}", std::process::id(), rand::random::<u32>());
    let _drop = DropSchema(schema.clone());
    let location = StoreLocation::Postgres {
        url: pg_url(),
        schema,
    };
    let mut fleet = tether::fleet::Fleet::build_on(
        dir.path(),
        2,
        Duration::from_millis(500),
        None,
        Some(location),
        None,
    )
    .expect("fleet on postgres");
    for c in &fleet.clinics {
        write_activity(&c.db, 40);
    }
    fleet.start_agents().await.expect("agents");
    for c in &fleet.clinics {
        write_activity(&c.db, 120);
    }
    let base = fleet.http_url();
    let clinic = fleet.clinics[0].id.clone();
    let id = tether::fleet::cloud_id(1);
    let (status, v) = post_json(
        &format!("{base}/v1/clinics/{clinic}/updates"),
        &json!({"entity": "patient", "op": "upsert", "key": {"id": id}, "row": {"id": id, "name": "Cloud"}}),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    let update_id = v["update_id"].as_str().expect("update_id").to_string();
    wait_drained(&fleet, Duration::from_secs(30)).await;
    let gw_store = fleet.store().expect("store");
    wait_until(
        "the cloud update to be applied",
        Duration::from_secs(20),
        || {
            let status = store::wait(gw_store.update(&update_id))
                .ok()
                .flatten()
                .map(|u| u.status);
            async move { status.as_deref() == Some("applied") }
        },
    )
    .await;
    let reports = assert_history_clean(&fleet, &[(0, "patient".to_string(), json!({"id": id}))]);
    // 160 steps of activity each (some steps change nothing): changes must have flowed.
    assert!(reports.iter().all(|r| r.written >= 80), "{reports:?}");
    let (status, clinics) = get_json(&format!("{base}/v1/clinics")).await;
    assert_eq!(status, 200);
    let events: u64 = clinics["clinics"]
        .as_array()
        .expect("clinics")
        .iter()
        .map(|c| c["events"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        events,
        reports.iter().map(|r| r.at_gateway).sum::<u64>(),
        "counters match the rows"
    );
    let (status, ready) = get_json(&format!("{base}/readyz")).await;
    assert_eq!(
        (status, ready["store"].as_str()),
        (200, Some("postgres")),
        "{ready}"
    );
    fleet.stop().await;
}

#[cfg(feature = "postgres")]
struct DropSchema(String);

#[cfg(feature = "postgres")]
impl Drop for DropSchema {
    fn drop(&mut self) {
        let schema = self.0.clone();
        // The driver must not run on a runtime thread.
        let _ = std::thread::spawn(move || {
            if let Ok(mut c) = ::postgres::Client::connect(&pg_url(), ::postgres::NoTls) {
                let _ = c.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
            }
        })
        .join();
    }
}

/// Nodes started together on a new database all open the store: the race to create its schema
/// (and to migrate it) is nobody's failure.
#[cfg(feature = "postgres")]
#[test]
fn nodes_starting_together_on_a_new_schema_all_open_it() {
    let schema = format!(
        "together_{}_{:x}",
        std::process::id(),
        rand::random::<u32>()
    );
    let _drop = DropSchema(schema.clone());
    let barrier = Arc::new(std::sync::Barrier::new(4));
    let opened: Vec<_> = (0..4)
        .map(|i| {
            let (schema, barrier) = (schema.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut s = StoreSettings::sqlite("unused");
                s.location = StoreLocation::Postgres {
                    url: pg_url(),
                    schema,
                };
                s.node = format!("node-{i}");
                barrier.wait();
                store::open(&s).map(|st| st.close())
            })
        })
        .collect();
    for (i, t) in opened.into_iter().enumerate() {
        let r = t.join().expect("thread");
        assert!(r.is_ok(), "node {i}: {r:?}");
    }
}

/// A PostgreSQL error names what the server said (SQLSTATE and message), not the driver's
/// "db error".
#[cfg(feature = "postgres")]
#[test]
fn a_postgresql_error_says_what_the_server_said() {
    let url = pg_url().replace("dbname=test", "dbname=tether_no_such_database");
    let mut s = StoreSettings::sqlite("unused");
    s.location = StoreLocation::Postgres {
        url,
        schema: "tether".into(),
    };
    let err = match store::open(&s) {
        Ok(_) => panic!("a database that does not exist opened"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("tether_no_such_database") && err.contains("3D000"),
        "{err}"
    );
}
