//! SQL Server: the driver path and the pool against Microsoft's mock TDS server (login + a
//! registered query; it knows no T-SQL), and a live suite against a real server that runs
//! when TETHER_TEST_MSSQL holds an ADO connection string:
//!
//!     TETHER_TEST_MSSQL='server=tcp:host,1433;user=sa;password=…;trustservercertificate=true' \
//!       cargo nextest run --all-features --run-ignored only -E 'binary(sqlserver)'

use std::time::Duration;

use serde_json::{json, Value};
use tether::config::{ConflictPolicy, Direction, TableConfig};
use tether::db::sqlserver::{self, MssqlCheckpoint, MssqlDb, MssqlSink, MssqlSource};
use tether_actors::ports::{ChangeSink, ChangeSource, Checkpoint};
use tether_schemas::{Update, UpdateOp, UpdateStatus};

/// Microsoft's mock TDS server, running on a runtime of its own: the runtime (keep it), an
/// ADO connection string for it, and its query registry (responses by query text).
fn mock_server() -> (
    tokio::runtime::Runtime,
    String,
    std::sync::Arc<tokio::sync::Mutex<mssql_mock_tds::QueryRegistry>>,
) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let server = rt
        .block_on(mssql_mock_tds::MockTdsServer::new("127.0.0.1:0"))
        .expect("mock server");
    let addr = server.local_addr();
    let registry = server.query_registry();
    rt.spawn(async move {
        let _ = server.run().await;
    });
    let conn = format!(
        "server=tcp:127.0.0.1,{};user=sa;password=not-a-secret;encrypt=DANGER_PLAINTEXT",
        addr.port()
    );
    (rt, conn, registry)
}

#[test]
fn pool_logs_in_and_queries_through_the_mock_tds_server() {
    let (_rt, conn, _) = mock_server();
    // The adapter's own pool (bb8-tiberius 0.16 over tiberius 0.12.3) and timeout wrapper.
    let db = std::thread::spawn(move || {
        let db = MssqlDb::connect(&conn, None, Duration::from_secs(10)).expect("pool");
        let one = db
            .run(|c| {
                Box::pin(async move {
                    let row = c.simple_query("SELECT 1").await?.into_row().await?;
                    Ok(row.and_then(|r| r.get::<i32, _>(0)))
                })
            })
            .expect("SELECT 1");
        (db, one)
    })
    .join()
    .expect("client thread");
    assert_eq!(db.1, Some(1));
    // Connections go back to the pool and are reused: more queries than the pool's size.
    let results = std::thread::spawn(move || {
        (0..6)
            .map(|_| {
                db.0.run(|c| {
                    Box::pin(async move {
                        let row = c.simple_query("SELECT 1").await?.into_row().await?;
                        Ok(row.and_then(|r| r.get::<i32, _>(0)))
                    })
                })
                .expect("SELECT 1")
            })
            .collect::<Vec<_>>()
    })
    .join()
    .expect("thread");
    assert_eq!(results, vec![Some(1); 6]);
}

#[test]
fn an_unreachable_server_times_out_with_a_clear_error() {
    // A port nothing listens on: connection refused or timeout, never a hang.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let conn = format!("server=tcp:127.0.0.1,{port};user=sa;password=x;encrypt=DANGER_PLAINTEXT");
    let started = std::time::Instant::now();
    let r = std::thread::spawn(move || {
        MssqlDb::connect(&conn, None, Duration::from_secs(2)).map(|_| ())
    })
    .join()
    .expect("thread");
    assert!(r.is_err());
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// The one-agent lock's driver path through the mock TDS server: a lock another session holds
/// (`sp_getapplock` answers -1) is waited for until the deadline, then refused naming the holder
/// the server reports; once free (0) it is taken.
#[test]
fn the_one_agent_lock_waits_then_names_the_holder_through_the_mock_tds_server() {
    use mssql_mock_tds::{ColumnDefinition, ColumnValue, QueryResponse, Row, SqlDataType};
    use tether::db::instance::InstanceError;
    let (rt, conn, registry) = mock_server();
    let answer = |r: i32| {
        QueryResponse::new(
            vec![ColumnDefinition::new("", SqlDataType::Int)],
            vec![Row::new(vec![ColumnValue::Int(r)])],
        )
    };
    rt.block_on(async {
        let mut q = registry.lock().await;
        q.register(sqlserver::INSTANCE_LOCK_SQL, answer(-1));
        q.register(
            sqlserver::INSTANCE_HOLDER_SQL,
            QueryResponse::new(
                vec![
                    ColumnDefinition::new("program_name", SqlDataType::NVarChar),
                    ColumnDefinition::new("host_name", SqlDataType::NVarChar),
                    ColumnDefinition::new("since", SqlDataType::NVarChar),
                ],
                vec![Row::new(vec![
                    ColumnValue::NVarChar("tether-agent reception-pc pid 4242".into()),
                    ColumnValue::NVarChar("RECEPTION-PC".into()),
                    ColumnValue::NVarChar("2026-12-02T08:00:00".into()),
                ])],
            ),
        );
    });
    let t = Duration::from_secs(10);
    let c = conn.clone();
    let refused = std::thread::spawn(move || {
        let t0 = std::time::Instant::now();
        let r = sqlserver::lock_instance(&c, None, t, Duration::from_millis(300));
        (r.err(), t0.elapsed())
    })
    .join()
    .expect("client thread");
    match refused {
        (Some(InstanceError::Held { holder }), waited) => {
            assert_eq!(
                holder,
                "tether-agent reception-pc pid 4242 from RECEPTION-PC, since 2026-12-02T08:00:00"
            );
            assert!(
                waited >= Duration::from_millis(300),
                "it waited first: {waited:?}"
            );
        }
        other => panic!("a held lock must be refused naming the holder: {other:?}"),
    }
    rt.block_on(async {
        registry
            .lock()
            .await
            .register(sqlserver::INSTANCE_LOCK_SQL, answer(0))
    });
    let taken = std::thread::spawn(move || {
        sqlserver::lock_instance(&conn, None, t, Duration::ZERO).is_ok()
    })
    .join()
    .expect("client thread");
    assert!(taken, "a free lock is taken");
}

/// `agent.rpc.queries` on SQL Server through the mock TDS server: SQL Server is asked to parse
/// and bind each query at start (`sp_describe_first_result_set`), the isolation is chosen from
/// the database's snapshot setting, and a run binds its parameter as a real parameter in one
/// rolled-back batch, returns at most `max_rows` with `truncated`, and every value in the wire
/// form. A write, an undeclared parameter and a query SQL Server refuses stop the start.
#[test]
fn rpc_queries_run_parameterised_and_answer_in_the_wire_form_through_the_mock_tds_server() {
    use mssql_mock_tds::{ColumnDefinition, ColumnValue, QueryResponse, Row, SqlDataType};
    use tether::config::{RpcConfig, RpcQueryConfig};
    use tether::db::sqlserver::queries::{self, MssqlQueries};
    use tether_actors::ports::QueryRunner;
    let (rt, conn, registry) = mock_server();
    // Upper case: the mock finds a registered text inside an RPC request as it was registered.
    let sql = "SELECT ID, NAME, NOTE, PHOTO FROM PATIENTS WHERE ID = :id OR PARENT = :id";
    let (body, order) = queries::render(sql);
    assert_eq!(order, vec!["id"]);
    let timeout = Duration::from_secs(5);
    let columns = || {
        vec![
            ColumnDefinition::new("ID", SqlDataType::Int),
            ColumnDefinition::new("NAME", SqlDataType::NVarChar),
            ColumnDefinition::new("NOTE", SqlDataType::NVarChar),
            ColumnDefinition::new("PHOTO", SqlDataType::VarBinaryMax),
        ]
    };
    // No NULLs: the mock's NULL cells leave tiberius waiting for the rest of the row (NULLs
    // are covered by the unit tests of `cell_json`).
    let row = |id: i32, name: &str, note: &str, photo: Vec<u8>| {
        Row::new(vec![
            ColumnValue::Int(id),
            ColumnValue::NVarChar(name.into()),
            ColumnValue::NVarChar(note.into()),
            ColumnValue::VarBinaryMax(vec![photo]),
        ])
    };
    rt.block_on(async {
        let mut q = registry.lock().await;
        q.register(
            queries::probe_sql(&body, 1),
            QueryResponse::new(columns(), vec![]),
        );
        // What SQL Server answers when the query names a column that does not exist.
        q.register(
            queries::probe_sql("SELECT NOTHING FROM PATIENTS", 0),
            QueryResponse::error_only(mssql_mock_tds::TerminalError::new(
                207,
                16,
                "Invalid column name 'NOTHING'.",
            )),
        );
        q.register(
            queries::SNAPSHOT_STATE_SQL,
            QueryResponse::new(
                vec![ColumnDefinition::new("state", SqlDataType::Int)],
                vec![Row::new(vec![ColumnValue::Int(1)])],
            ),
        );
        q.register(
            queries::batch(&body, 2, timeout, true),
            QueryResponse::new(
                columns(),
                vec![
                    row(7, "Zoë", "first", vec![0, 255]),
                    row(8, "O'Brien", "", vec![1, 2]),
                    row(9, "third", "x", vec![3]),
                ],
            ),
        );
    });
    let rpc = |text: &str, params: &[&str]| {
        let mut q = RpcQueryConfig::default();
        q.sql = text.into();
        q.params = params.iter().map(|p| p.to_string()).collect();
        q.max_rows = 2;
        let mut r = RpcConfig::default();
        r.queries.insert("family".into(), q);
        r.timeout = tether::config::Dur::secs(5);
        r
    };
    let good = rpc(sql, &["id"]);
    let outcome = std::thread::spawn(move || {
        let db = MssqlDb::connect(&conn, None, Duration::from_secs(10)).expect("pool");
        let runner = MssqlQueries::open(db.clone(), &good).expect("open");
        let params = |v: Value| v.as_object().cloned().unwrap_or_default();
        let rows = runner
            .run("family", &params(json!({"id": 7})))
            .expect("run");
        let missing = runner.run("family", &params(json!({}))).unwrap_err();
        let extra = runner
            .run("family", &params(json!({"id": 7, "x": 1})))
            .unwrap_err();
        let object = runner
            .run("family", &params(json!({"id": {"a": 1}})))
            .unwrap_err();
        let unknown = runner.run("nope", &params(json!({}))).unwrap_err();
        let write = MssqlQueries::open(db.clone(), &rpc("SELECT * INTO COPY FROM PATIENTS", &[]))
            .err()
            .map(|e| e.to_string());
        let undeclared = MssqlQueries::open(db.clone(), &rpc(sql, &[]))
            .err()
            .map(|e| e.to_string());
        let refused = MssqlQueries::open(db, &rpc("SELECT NOTHING FROM PATIENTS", &[]))
            .err()
            .map(|e| e.to_string());
        (
            rows, missing, extra, object, unknown, write, undeclared, refused,
        )
    })
    .join()
    .expect("client thread");
    let (rows, missing, extra, object, unknown, write, undeclared, refused) = outcome;
    assert!(rows.truncated, "three rows for max_rows 2");
    assert_eq!(
        rows.rows.into_iter().map(Value::Object).collect::<Vec<_>>(),
        vec![
            json!({"ID": 7, "NAME": "Zoë", "NOTE": "first", "PHOTO": "AP8="}),
            json!({"ID": 8, "NAME": "O'Brien", "NOTE": "", "PHOTO": "AQI="}),
        ]
    );
    assert_eq!(missing.field.as_deref(), Some("params.id"));
    assert_eq!(extra.field.as_deref(), Some("params.x"));
    assert_eq!(object.field.as_deref(), Some("params.id"));
    assert_eq!(unknown.field.as_deref(), Some("name"));
    let write = write.unwrap_or_default();
    assert!(
        write.contains("agent.rpc.queries.family") && write.contains("INTO"),
        "{write}"
    );
    let undeclared = undeclared.unwrap_or_default();
    assert!(undeclared.contains("uses :id"), "{undeclared}");
    let refused = refused.unwrap_or_default();
    assert!(
        refused.contains("agent.rpc.queries.family")
            && refused.contains("does not accept")
            && refused.contains("Invalid column name"),
        "{refused}"
    );
}

fn live() -> String {
    std::env::var("TETHER_TEST_MSSQL").expect(
        "TETHER_TEST_MSSQL must hold an ADO connection string for the live SQL Server suite",
    )
}

/// The shared table of values (`values::fixture`) live: applied as cloud updates to `bit`,
/// `datetime2`, `date`, `decimal`, `varbinary` and `nvarchar` columns, captured again by a
/// local write, every value comes back in the same wire form.
#[test]
#[ignore = "needs a SQL Server: set TETHER_TEST_MSSQL and run with --run-ignored only"]
fn live_values_round_trip_in_one_wire_form() {
    let conn = live();
    let table = format!("tether_kinds_{:x}", rand::random::<u32>());
    let tables = vec![TableConfig::new(&table, "kind", &["id"], Direction::Both)];
    std::thread::spawn(move || {
        let db = MssqlDb::connect(&conn, None, Duration::from_secs(30)).expect("connect");
        db.batches(&[format!(
            "CREATE TABLE [dbo].[{table}] (id int PRIMARY KEY, flag bit NULL, at datetime2(7) NULL, \
             day date NULL, amount decimal(12,4) NULL, data varbinary(max) NULL, note nvarchar(100) NULL)"
        )])
        .expect("table");
        db.batches(&sqlserver::install_script(&tables)).expect("install");
        let sink = MssqlSink::new(db.clone(), &tables);
        let rows = tether::db::values::fixture::rows();
        for row in &rows {
            let out = sink
                .apply(&Update {
                    update_id: format!("v{}", row["id"]),
                    entity: "kind".into(),
                    op: UpdateOp::Upsert,
                    key: json!({"id": row["id"]}).as_object().cloned().unwrap_or_default(),
                    row: row.as_object().cloned(),
                })
                .expect("apply");
            assert_eq!(out.status, UpdateStatus::Applied, "{:?}", out.reason);
        }
        db.batches(&[format!("UPDATE [dbo].[{table}] SET id = id")]).expect("touch");
        let src = MssqlSource::triggers(db.clone(), &tables);
        let mut got: Vec<Value> = src
            .read_after(0, 100)
            .expect("read")
            .into_iter()
            .filter_map(|e| e.row.map(Value::Object))
            .collect();
        got.sort_by_key(|r| r["id"].as_i64());
        assert_eq!(got, rows, "every value comes back in the same wire form");
        db.batches(&sqlserver::uninstall_script(&tables)).expect("uninstall");
        db.batches(&[format!("DROP TABLE [dbo].[{table}]")]).expect("drop");
    })
    .join()
    .expect("live thread");
}

/// `agent.rpc.queries` live: a parameter with a quote stays data, `max_rows` truncates, values
/// come back in the wire form, and nothing the batch could write stays.
#[test]
#[ignore = "needs a SQL Server: set TETHER_TEST_MSSQL and run with --run-ignored only"]
fn live_rpc_queries() {
    use tether::config::{RpcConfig, RpcQueryConfig};
    use tether::db::sqlserver::queries::MssqlQueries;
    use tether_actors::ports::QueryRunner;
    let conn = live();
    let table = format!("tether_rpc_{:x}", rand::random::<u32>());
    std::thread::spawn(move || {
        let db = MssqlDb::connect(&conn, None, Duration::from_secs(30)).expect("connect");
        db.batches(&[format!(
            "CREATE TABLE [dbo].[{table}] (id int PRIMARY KEY, name nvarchar(100), balance decimal(10,2), \
             seen datetime2(3), photo varbinary(max), active bit); \
             INSERT INTO [dbo].[{table}] VALUES (1, N'O''Brien', 12.50, '2026-12-01T10:00:00.250', 0x00FF, 1), \
             (2, N'b', NULL, NULL, NULL, 0), (3, N'c', 1, NULL, NULL, 0);"
        )])
        .expect("table");
        let mut q = RpcQueryConfig::default();
        q.sql = format!("SELECT id, name, balance, seen, photo, active FROM [dbo].[{table}] WHERE name = :name OR id > :min ORDER BY id");
        q.params = vec!["name".into(), "min".into()];
        q.max_rows = 2;
        let mut rpc = RpcConfig::default();
        rpc.queries.insert("q".into(), q);
        let runner = MssqlQueries::open(db.clone(), &rpc).expect("open");
        let rows = runner
            .run("q", json!({"name": "O'Brien", "min": 1}).as_object().expect("params"))
            .expect("run");
        assert!(rows.truncated);
        assert_eq!(
            Value::Object(rows.rows[0].clone()),
            json!({"id": 1, "name": "O'Brien", "balance": "12.5", "seen": "2026-12-01T10:00:00.25Z",
                   "photo": "AP8=", "active": true})
        );
        assert_eq!(rows.rows[1]["balance"], Value::Null);
        db.batches(&[format!("DROP TABLE [dbo].[{table}]")]).expect("drop");
    })
    .join()
    .expect("live thread");
}

#[test]
#[ignore = "needs a SQL Server: set TETHER_TEST_MSSQL and run with --run-ignored only"]
fn live_capture_apply_conflict_and_uninstall() {
    let conn = live();
    let table = format!("tether_live_{:x}", rand::random::<u32>());
    let mut t = TableConfig::new(&table, "patient", &["id"], Direction::Both);
    t.conflict = ConflictPolicy::ClinicWins;
    let tables = vec![t];
    std::thread::spawn(move || {
        let db = MssqlDb::connect(&conn, None, Duration::from_secs(30)).expect("connect");
        let create = format!("CREATE TABLE [dbo].[{table}] (id int PRIMARY KEY, name nvarchar(100) NOT NULL, balance decimal(10,2) NULL)");
        db.batches(&[create]).expect("table");
        db.batches(&sqlserver::install_script(&tables)).expect("install");
        db.batches(&sqlserver::install_script(&tables)).expect("install is idempotent");
        db.batches(&[format!(
            "INSERT INTO [dbo].[{table}] (id, name, balance) VALUES (1, N'a', 1.50), (2, N'b', NULL); \
             UPDATE [dbo].[{table}] SET name = UPPER(name); DELETE FROM [dbo].[{table}] WHERE id = 2;"
        )])
        .expect("writes");
        let src = MssqlSource::triggers(db.clone(), &tables);
        let events = src.read_after(0, 100).expect("read");
        let ops: Vec<(&str, i64)> = events.iter().map(|e| (e.op.as_str(), e.key["id"].as_i64().unwrap_or(-1))).collect();
        assert_eq!(ops, vec![("insert", 1), ("insert", 2), ("update", 1), ("update", 2), ("delete", 2)]);
        assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
        let sink = MssqlSink::new(db.clone(), &tables);
        let up = |id: &str, key: i64| Update {
            update_id: id.into(),
            entity: "patient".into(),
            op: UpdateOp::Upsert,
            key: json!({"id": key}).as_object().cloned().unwrap_or_default(),
            row: json!({"id": key, "name": "cloud", "balance": 9.99}).as_object().cloned(),
        };
        // Row 1 has unacknowledged clinic changes: clinic_wins keeps it.
        assert_eq!(sink.apply(&up("u1", 1)).expect("apply").status, UpdateStatus::Conflict);
        let last = events.last().map(|e| e.seq).unwrap_or(0);
        MssqlCheckpoint(db.clone()).save(last).expect("ack");
        assert_eq!(sink.apply(&up("u2", 1)).expect("apply").status, UpdateStatus::Applied);
        assert_eq!(sink.apply(&up("u3", 3)).expect("apply").status, UpdateStatus::Applied);
        assert!(sink.apply(&up("u3", 3)).expect("again").duplicate);
        assert!(src.read_after(last, 100).expect("read").is_empty(), "applied updates are not echoed");
        db.batches(&sqlserver::uninstall_script(&tables)).expect("uninstall");
        db.batches(&[format!("DROP TABLE [dbo].[{table}]")]).expect("drop");
    })
    .join()
    .expect("live suite");
}

/// One agent per database on SQL Server too: a second agent is refused, naming the first
/// (its `program_name` carries host and pid), and takes the lock once the first lets go.
#[test]
#[ignore = "needs a SQL Server: set TETHER_TEST_MSSQL and run with --run-ignored only"]
fn live_a_second_agent_on_one_database_is_refused_and_named() {
    use tether::db::instance::InstanceError;
    let conn = live();
    std::thread::spawn(move || {
        let t = Duration::from_secs(30);
        let first = sqlserver::lock_instance(&conn, None, t, Duration::ZERO).expect("first");
        match sqlserver::lock_instance(&conn, None, t, Duration::from_millis(300)) {
            Err(InstanceError::Held { holder }) => assert!(
                holder.contains(&format!("pid {}", std::process::id()))
                    || holder.contains("VIEW SERVER STATE"),
                "{holder}"
            ),
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("a second agent must be refused"),
        }
        drop(first);
        sqlserver::lock_instance(&conn, None, t, Duration::from_secs(5))
            .expect("free once the first session ended");
    })
    .join()
    .expect("live lock test");
}
