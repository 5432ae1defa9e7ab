// The SDK as a package: `npm pack` makes a tarball that installs into a fresh project
// and imports by its name, with its types, at the server's version.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync, existsSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const pkgDir = join(here, '..');

test('npm pack installs into a fresh project and imports by name with its types', () => {
  const work = mkdtempSync(join(tmpdir(), 'outpost-pack-'));
  try {
    const out = execFileSync('npm', ['pack', '--silent', '--pack-destination', work], { cwd: pkgDir, encoding: 'utf8' });
    const tarball = join(work, out.trim().split('\n').pop());
    assert.ok(existsSync(tarball), `no tarball: ${out}`);
    const app = join(work, 'app');
    execFileSync('mkdir', ['-p', app]);
    writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'app', private: true, type: 'module' }));
    execFileSync('npm', ['install', '--silent', '--no-audit', '--no-fund', '--offline', tarball], { cwd: app });
    const installed = join(app, 'node_modules', '@outpost', 'client');
    for (const f of ['outpost.js', 'outpost.d.ts', 'README.md', 'package.json']) {
      assert.ok(existsSync(join(installed, f)), `${f} missing from the package`);
    }
    writeFileSync(
      join(app, 'use.mjs'),
      "import { Outpost, OutpostError, backoffDelay } from '@outpost/client';\n" +
        "console.log(JSON.stringify({ outpost: typeof Outpost, error: typeof OutpostError, backoff: typeof backoffDelay }));\n",
    );
    const seen = JSON.parse(execFileSync('node', ['use.mjs'], { cwd: app, encoding: 'utf8' }));
    assert.deepEqual(seen, { outpost: 'function', error: 'function', backoff: 'function' });
    // Versioned with the server: the workspace's version.
    const cargo = readFileSync(join(pkgDir, '..', '..', 'Cargo.toml'), 'utf8');
    const version = /\nversion = "([^"]+)"/.exec(cargo)?.[1];
    const pkg = JSON.parse(readFileSync(join(installed, 'package.json'), 'utf8'));
    assert.equal(pkg.version, version);
    assert.equal(pkg.types, './outpost.d.ts');
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
});
