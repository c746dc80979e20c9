//! The JSON Schema of a rule file, generated from the types authors' YAML is read into, so the
//! schema editors validate with (`rules/schema.json`) cannot drift from what the engine accepts.

use schemars::generate::SchemaSettings;

use crate::model::RuleFile;

/// Where the schema is checked in, relative to the rules directory's parent.
pub const SCHEMA_FILE: &str = "rules/schema.json";

/// The schema as pretty JSON with a final newline: what `rules/schema.json` must hold.
pub fn rule_file_schema() -> String {
    // Draft 7: what yaml-language-server (VS Code, Neovim, JetBrains via LSP) validates best.
    let schema = SchemaSettings::draft07()
        .into_generator()
        .into_root_schema_for::<RuleFile>();
    let mut text = serde_json::to_string_pretty(&schema).expect("a schema serializes");
    text.push('\n');
    text
}
