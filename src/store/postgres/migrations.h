#ifndef CONVERGE_STORE_POSTGRES_MIGRATIONS_H_
#define CONVERGE_STORE_POSTGRES_MIGRATIONS_H_

#include <vector>

namespace converge::postgres {

// Migrations()[i] takes the schema from version i to i + 1; the same meaning as the
// SQLite list (src/store/sqlite/migrations.cc), in PostgreSQL's dialect.
const std::vector<const char*>& Migrations();

}  // namespace converge::postgres

#endif  // CONVERGE_STORE_POSTGRES_MIGRATIONS_H_
