// Rendering the schema templates for a dialect, and the migration runner both backends
// use (schema.h).
#include "src/core/schema/schema.h"

#include <optional>

namespace converge::schema {
namespace {

// The fragment for one token, or nullopt when the token is unknown.
std::optional<std::string_view> Fragment(std::string_view token, const SchemaDialect& d) {
  if (token == "bigint") return d.TypeName(ColumnType::kBigint);
  if (token == "double") return d.TypeName(ColumnType::kDouble);
  if (token == "blob") return d.TypeName(ColumnType::kBlob);
  if (token == "autoincrement_pk") return d.AutoIncrementPrimaryKey();
  if (token == "without_rowid") return d.WithoutRowid();
  if (token == "fence_sequence") return d.CreateFenceSequence();
  if (token == "partitioned_retention") return d.PartitionedRetentionTables();
  if (token == "deferred_checks") return d.DeferredCheckFunctions();
  if (token == "partitioned_outbox") return d.PartitionedOutbox();
  if (token == "drop_outbox_partition_index") return d.DropOutboxPartitionIndex();
  if (token == "drop_expiry_indexes") {
    return d.SweepsInKeyOrder() ? std::string_view(
                                      "DROP INDEX IF EXISTS idempotency_keys_expires;\n"
                                      "DROP INDEX IF EXISTS consumer_inbox_expires;")
                                : std::string_view();
  }
  return std::nullopt;
}

// The version table itself is created outside the numbered migrations: it must exist
// before anything can be counted.
constexpr std::string_view kVersionTable =
    "CREATE TABLE IF NOT EXISTS converge_schema (version {{bigint}} NOT NULL)";

Status Apply(MigrationTarget& target, std::string_view store,
             const std::vector<std::string>& scripts, const std::string& version_table) {
  CONVERGE_RETURN_IF_ERROR(target.ExecScript(version_table));
  CONVERGE_ASSIGN_OR_RETURN(
      Rows rows, target.Query("SELECT coalesce(max(version), 0) FROM converge_schema", {}));
  const int64_t version = rows.empty() ? 0 : rows[0].Int(0);
  const auto known = static_cast<int64_t>(scripts.size());
  if (version > known) {
    return Status(StatusCode::kFailedPrecondition,
                  std::string(store) + " has schema version " + std::to_string(version) +
                      ", newer than this binary's " + std::to_string(known) +
                      "; upgrade converge",
                  reason::kSchemaTooNew);
  }
  for (int64_t v = version; v < known; ++v) {
    const std::string& script = scripts[static_cast<size_t>(v)];
    // A migration with nothing to do on this store (PostgreSQL refuses an empty query).
    const bool blank = script.find_first_not_of(" \t\r\n") == std::string::npos;
    Status st = blank ? OkStatus() : target.ExecScript(script);
    if (st.ok()) {
      const Value next = v + 1;
      st = StatusOf(target.Query("INSERT INTO converge_schema (version) VALUES ($1)", {&next, 1}));
    }
    if (!st.ok()) {
      return Status(st.code(), "migration " + std::to_string(v + 1) + ": " + st.message(),
                    st.reason());
    }
  }
  return OkStatus();
}

}  // namespace

Result<std::string> Render(std::string_view tmpl, const SchemaDialect& dialect) {
  std::string out;
  out.reserve(tmpl.size());
  size_t pos = 0;
  for (;;) {
    const size_t open = tmpl.find("{{", pos);
    if (open == std::string_view::npos) break;
    const size_t close = tmpl.find("}}", open + 2);
    if (close == std::string_view::npos) {
      return tl::unexpected(InternalError("schema template: '{{' without '}}' at offset " +
                                          std::to_string(open)));
    }
    const std::string_view token = tmpl.substr(open + 2, close - open - 2);
    const auto fragment = Fragment(token, dialect);
    if (!fragment) {
      return tl::unexpected(
          InternalError("schema template: unknown token {{" + std::string(token) + "}}"));
    }
    out.append(tmpl.substr(pos, open - pos));
    out.append(*fragment);
    pos = close + 2;
  }
  out.append(tmpl.substr(pos));
  return out;
}

Status Migrate(MigrationTarget& target, std::string_view store,
               std::span<const std::string_view> migrations) {
  // Render everything first: a broken template must not leave a half-migrated store.
  std::vector<std::string> scripts;
  scripts.reserve(migrations.size());
  for (size_t i = 0; i < migrations.size(); ++i) {
    auto sql = Render(migrations[i], target.dialect());
    if (!sql) {
      return InternalError("migration " + std::to_string(i + 1) + ": " + sql.error().message());
    }
    scripts.push_back(std::move(*sql));
  }
  CONVERGE_ASSIGN_OR_RETURN(std::string version_table, Render(kVersionTable, target.dialect()));

  CONVERGE_RETURN_IF_ERROR(target.BeginLocked());
  Status st = Apply(target, store, scripts, version_table);
  if (st.ok()) st = target.Commit();
  if (!st.ok()) target.Rollback();
  return st;
}

}  // namespace converge::schema
