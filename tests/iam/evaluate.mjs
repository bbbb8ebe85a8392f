// Evaluates AWS requests against identity policies with @cloud-copilot/iam-simulate (a real IAM
// policy evaluator: action/resource matching, resource types per action, conditions).
// stdin: {"cases": [{"principal", "action", "resource", "account", "policies": [{name, policy}]}]}
// stdout: [{"result": "Allowed" | "ImplicitlyDenied" | "ExplicitlyDenied" | "Error", "detail": ...}]
import { runSimulation } from '@cloud-copilot/iam-simulate'

const chunks = []
for await (const chunk of process.stdin) chunks.push(chunk)
const { cases } = JSON.parse(Buffer.concat(chunks).toString('utf8'))

const answers = []
for (const c of cases) {
  const response = await runSimulation({
    identityPolicies: c.policies,
    serviceControlPolicies: [],
    resourceControlPolicies: [],
    request: {
      action: c.action,
      principal: c.principal,
      resource: { resource: c.resource, accountId: c.account },
      contextVariables: {},
    },
  }, {})
  if (response.resultType === 'error') {
    answers.push({ result: 'Error', detail: response.errors })
  } else {
    answers.push({ result: response.overallResult })
  }
}
process.stdout.write(JSON.stringify(answers))
