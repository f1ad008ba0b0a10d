//! The broker on a PostgreSQL store (`--store postgres://…`), on a throwaway PostgreSQL started by
//! the tests (`tests/support/pg.rs`).

mod common;

use common::pg::PgServer;

#[test]
fn the_test_postgres_serves_a_database_of_its_own_and_is_removed_when_dropped() {
    let server = PgServer::shared();
    let db = server.create_database();
    server.psql(db.name(), "CREATE TABLE t (x int); INSERT INTO t VALUES (41), (1)");
    assert_eq!(server.psql(db.name(), "SELECT sum(x) FROM t"), "42");
    let other = server.create_database();
    assert_eq!(server.psql(other.name(), "SELECT count(*) FROM pg_tables WHERE tablename = 't'"), "0");
    let dir = server.socket_directory();
    assert!(dir.exists());
    drop((db, other, server));
    assert!(!dir.exists(), "the cluster's directory outlived the last user of the server");
}
