'use strict';
// `npm run compile`: the extension is plain JavaScript (nothing to transpile); this checks
// that every source parses, so a syntax error fails the build instead of the editor.
const { execFileSync } = require('child_process');
const fs = require('fs');
const path = require('path');

const dir = path.join(__dirname, '..', 'src');
for (const f of fs.readdirSync(dir).filter((n) => n.endsWith('.js'))) {
  execFileSync(process.execPath, ['--check', path.join(dir, f)], { stdio: 'inherit' });
}
console.log('sources ok');
