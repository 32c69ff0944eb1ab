#ifndef CONVERGE_STORE_SQLITE_MIGRATIONS_H_
#define CONVERGE_STORE_SQLITE_MIGRATIONS_H_

#include <vector>

namespace converge::sqlite {

// Migrations()[i] takes the schema from version i to i + 1.
const std::vector<const char*>& Migrations();

}  // namespace converge::sqlite

#endif  // CONVERGE_STORE_SQLITE_MIGRATIONS_H_
